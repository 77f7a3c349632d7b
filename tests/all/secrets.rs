//! Tokens kept out of config files: read from files the configs name, never shown in logs or
//! in `job status`; a missing secret file is refused at the line that names it.
use crate::cluster::*;
use crate::federated::job_toml;

#[test]
fn tokens_from_files_run_a_job_and_never_show_in_logs_or_status() {
    let mut c = Cluster::new(3, "");
    let cloud = c.path("cloud.toml");
    let mut text = std::fs::read_to_string(&cloud).expect("cloud.toml");
    text = text.replace(&format!("admin_token = \"{}\"", c.admin), "admin_token_file = \"secrets/admin\"");
    std::fs::create_dir_all(c.path("secrets")).expect("mkdir");
    std::fs::write(c.path("secrets/admin"), format!("{}\n", c.admin)).expect("admin secret");
    for (name, token) in &c.nodes {
        text = text.replace(&format!("token = \"{token}\""), &format!("token_file = \"secrets/{name}\""));
        std::fs::write(c.path(&format!("secrets/{name}")), token).expect("node secret");
        let edge = c.path(&format!("{name}/edge.toml"));
        let e = std::fs::read_to_string(&edge)
            .expect("edge.toml")
            .replace(&format!("token = \"{token}\""), &format!("token_file = \"../secrets/{name}\""));
        std::fs::write(&edge, e).expect("edge.toml");
    }
    assert!(!text.contains("token-of-") && !text.contains(&c.admin), "no secret left in cloud.toml");
    std::fs::write(&cloud, text).expect("cloud.toml");

    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    c.apply("job", &job_toml("digits", "fedavg", 2, 3, 60.0));
    c.wait_done("digits");
    let status = c.nereid(&["job", "status", "digits", "--json"]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let mut shown = String::from_utf8_lossy(&status.stdout).into_owned();
    for entry in std::fs::read_dir(c.dir.path()).expect("dir").flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            shown.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    for (name, _) in &c.nodes {
        shown.push_str(&std::fs::read_to_string(c.path(&format!("{name}.log"))).unwrap_or_default());
    }
    assert!(shown.contains("digits"), "the status and logs were read");
    for secret in std::iter::once(c.admin.as_str()).chain(c.nodes.iter().map(|(_, t)| t.as_str())) {
        assert!(!shown.contains(secret), "`{secret}` shown");
    }

    // A secret file that is not there: refused at its line, naming the file.
    c.kill_cloud();
    std::fs::remove_file(c.path("secrets/admin")).expect("rm");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(["cloud", "--config"])
        .arg(&cloud)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cloud.toml:3") && err.contains("admin_token_file") && err.contains("secrets/admin"), "{err}");
}
