//! The container image (deploy/image): built offline FROM scratch with podman, a federated job
//! and an inference service run from its root filesystem (`podman image mount`, then chroot as
//! the image's non-root user with the image's environment: this machine has no container runtime
//! allowed to set rlimits), and the image pushed to the embedded registry and pulled back.
use std::path::{Path, PathBuf};
use std::process::Command;

use nereid::inference::export::to_onnx;
use nereid::train::ModelSpec;
use nereid_onnx::Message;
use serde_json::{json, Value};

use crate::cluster::*;
use crate::common::*;
use crate::federated::job_toml;
use crate::oci::{embedded, htpasswd_bcrypt};

/// The uid:gid the image runs as.
const IMAGE_USER: &str = "10001:10001";

/// podman with a storage of its own (vfs), removed when dropped.
struct Podman {
    storage: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        let found = Command::new("podman").arg("--version").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "podman is needed (Debian's podman; `cargo xtask test` installs it)"
        );
        Podman { storage: tempfile::tempdir().expect("tmp") }
    }

    fn dir(&self, which: &str) -> String {
        self.storage.path().join(which).display().to_string()
    }

    /// podman on this storage.
    fn command(&self) -> Command {
        let mut podman = Command::new("podman");
        podman.args(["--root", &self.dir("root"), "--runroot", &self.dir("run"), "--storage-driver", "vfs"]);
        podman
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("podman");
        assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
    }

    /// The containers-storage reference of `image` in this storage, for skopeo.
    fn reference(&self, image: &str) -> String {
        format!("containers-storage:[vfs@{}+{}]{image}", self.dir("root"), self.dir("run"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command().args(["image", "unmount", "--all"]).output();
    }
}

fn skopeo(args: &[&str]) -> std::process::Output {
    Command::new("skopeo").args(args).output().expect("skopeo (Debian's skopeo; `cargo xtask test` installs it)")
}

/// A script that runs `nereid` inside `rootfs` as the image runs it: its user, its environment
/// (`env`, then the cache directory the harness gives), /proc, /dev and /tmp (where the test's
/// files are) bound in a mount namespace of its own.
fn launcher(dir: &Path, rootfs: &str, env: &[String]) -> PathBuf {
    let env: Vec<String> = env.iter().map(|kv| format!("'{kv}'")).collect();
    let script = format!(
        "#!/bin/sh\nexec unshare --mount --propagation private /bin/sh -c '\n\
         root=$0\n\
         mount --rbind /proc \"$root/proc\" && mount --rbind /dev \"$root/dev\" && mount --bind /tmp \"$root/tmp\" || exit 1\n\
         exec env -i {env} NEREID_CACHE_DIR=\"$NEREID_CACHE_DIR\" chroot --userspec={IMAGE_USER} \"$root\" /usr/local/bin/nereid \"$@\"\n\
         ' {rootfs} \"$@\"\n",
        env = env.join(" ").replace('\'', "'\\''"),
    );
    let path = dir.join("in-image.sh");
    std::fs::write(&path, script).expect("launcher");
    assert!(Command::new("chmod").arg("+x").arg(&path).status().expect("chmod").success());
    path
}

#[test]
fn the_image_runs_a_job_and_a_service_from_its_root_filesystem_and_round_trips_through_the_registry() {
    let podman = Podman::new();
    let tag = "localhost/nereid:test";
    let build = Command::new(root().join("deploy/image/build.sh"))
        .args(["--tag", tag, "--storage", &podman.storage.path().display().to_string()])
        .args(["--context", &podman.dir("context"), "--binary", env!("CARGO_BIN_EXE_nereid")])
        .output()
        .expect("deploy/image/build.sh");
    assert!(build.status.success(), "build.sh: {}", String::from_utf8_lossy(&build.stderr));
    let id = String::from_utf8_lossy(&build.stdout).lines().last().unwrap_or_default().trim().to_string();
    let config: Value = serde_json::from_str(&podman.run(&["image", "inspect", tag])).expect("inspect");
    let config = &config[0]["Config"];
    assert_eq!(config["User"], IMAGE_USER, "the image runs as a non-root user");
    let env: Vec<String> =
        config["Env"].as_array().expect("Env").iter().map(|v| v.as_str().expect("a string").to_string()).collect();
    assert!(env.iter().any(|e| e.starts_with("NEREID_ONNXRUNTIME=")), "{env:?}");
    let size: u64 = podman.run(&["image", "inspect", "--format", "{{.Size}}", tag]).parse().expect("size");
    eprintln!("image {id}: {} MB", size / 1_000_000);

    let rootfs = podman.run(&["image", "mount", tag]);
    let in_image = |p: &str| Path::new(&rootfs).join(p.trim_start_matches('/'));
    assert!(in_image("usr/local/lib/nereid/libonnxruntime.so").exists());
    assert!(!in_image("bin/sh").exists(), "nothing but nereid and what it loads");

    // A federated job: cloud and edges from the image, the job's plugin the image's own.
    let rounds = 2;
    let job = job_toml("digits", "fedavg", rounds, 3, 60.0);
    let reference = crate::federated::reference_run(rounds);
    // The image sees /tmp only: the cluster's files live there, writable by the image's user.
    let mut c = Cluster::new_in(Path::new("/tmp"), 3, "");
    let run_in_image = launcher(c.dir.path(), &rootfs, &env).display().to_string();
    c.command = Box::new(move |_| vec![run_in_image.clone()]);
    let owned = Command::new("chown").args(["-R", IMAGE_USER]).arg(c.dir.path()).status().expect("chown");
    assert!(owned.success());
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    let image_fedavg = in_image("usr/share/nereid/plugins/nereid_fedavg.wasm").display().to_string();
    c.apply("job", &job.replace(&plugin("fedavg").display().to_string(), &image_fedavg));
    let s = c.wait_done("digits");
    assert!(s.history.iter().all(|h| h.participants.len() == 3), "{:?}", s.history);
    assert_eq!(c.model("digits", rounds), reference, "the image's binary computes what the build's does");
    let stat = std::fs::metadata(c.path("cloud.db")).expect("the cloud's state");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&stat), 10001, "written by the image's user");

    // A joint inference service on ONNX Runtime, its router the image's plugin.
    c.kill_edge(0);
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![16], classes: 10 };
    let models = c.path("models/digits");
    std::fs::create_dir_all(&models).expect("models");
    std::fs::write(models.join("model.onnx"), to_onnx(&spec, &spec.init(1)).expect("onnx").encode_to_vec())
        .expect("model");
    let service = format!(
        "models = {:?}\n[services.digits]\nkind = \"joint\"\nmodel = \"digits\"\n\
         router = {{ plugin = \"/usr/share/nereid/plugins/nereid_hard_example_mining.wasm\", config = {{ policy = \"edge-only\" }} }}\n",
        c.path("models").display().to_string()
    );
    let edge = c.start_serving_edge(0, &service);
    let x: Vec<f32> = (0..64).map(|i| (i % 16) as f32).collect();
    let body = serde_json::to_vec(&json!({"shape": [1, 64], "data": x})).expect("json");
    let (code, answer) = http("POST", &format!("{edge}/v1/infer/digits"), Some(EDGE_TOKEN), body);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&answer));

    // Pushed to the embedded registry (token auth, bcrypt user) and pulled into another storage.
    let users = format!("[users.ops]\npassword_bcrypt = \"{}\"\n", htpasswd_bcrypt("ops", "s3cret"));
    let registry = embedded(Some(&users), false);
    let remote = format!("docker://{}/fleet/nereid:1.0", registry.host);
    let source = podman.reference(tag);
    let anonymous = skopeo(&["copy", "--dest-tls-verify=false", &source, &remote]);
    assert!(!anonymous.status.success(), "a push without credentials is refused");
    let pushed = skopeo(&["copy", "--dest-tls-verify=false", "--dest-creds", "ops:s3cret", &source, &remote]);
    assert!(pushed.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&pushed.stderr));
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", "--creds", "ops:s3cret", &remote]);
    let manifest: Value = serde_json::from_slice(&raw.stdout).expect("the manifest");
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json", "{manifest}");
    let other = Podman::new();
    other.run(&[
        "pull",
        "--quiet",
        "--tls-verify=false",
        "--creds",
        "ops:s3cret",
        &format!("{}/fleet/nereid:1.0", registry.host),
    ]);
    let pulled =
        other.run(&["image", "inspect", "--format", "{{.Id}}", &format!("{}/fleet/nereid:1.0", registry.host)]);
    assert!(id.starts_with(&pulled) || pulled.starts_with(&id), "the same image came back: {id} vs {pulled}");
}
