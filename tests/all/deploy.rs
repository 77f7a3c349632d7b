//! The Kubernetes/KubeEdge manifests (deploy/kubernetes): each overlay renders with
//! `kubectl kustomize`, every object passes kubernetes-validate's strict schemas, and what the
//! objects say agrees with nereid and its image (configs nereid parses, probes on its probe
//! paths, the image's user, the config where the container is told to read it).
use std::path::Path;
use std::process::Command;

use nereid::config::cloud::CloudConfig;
use nereid::config::edge::EdgeConfig;
use serde_json::Value;

use crate::common::*;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES: &str = "1.30.0";

/// `kubectl kustomize dir`, then kubernetes-validate --strict over it; the objects, as JSON.
fn render(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (Debian's kubernetes-client; `cargo xtask test` installs it)");
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let rendered = dir.join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).expect("write");
    let python = venv_python("py-k8s", "kubernetes-validate");
    let validate = Command::new(python.with_file_name("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", KUBERNETES])
        .arg(&rendered)
        .output()
        .expect("kubernetes-validate");
    let report = String::from_utf8_lossy(&validate.stdout).to_string() + &String::from_utf8_lossy(&validate.stderr);
    assert!(validate.status.success() && !report.contains("ERROR"), "{}: {report}", dir.display());
    let json = Command::new(&python)
        .args(["-c", "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
        .arg(&rendered)
        .output()
        .expect("python");
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let objects: Vec<Value> = serde_json::from_slice(&json.stdout).expect("json");
    let validated = report.matches("passed for resource").count();
    assert_eq!(validated, objects.len(), "every object validated: {report}");
    objects
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The image's user, from its Containerfile.
fn image_user() -> (i64, i64) {
    let text = std::fs::read_to_string(root().join("deploy/image/Containerfile")).expect("Containerfile");
    let user = text.lines().find_map(|l| l.strip_prefix("USER ")).expect("a USER");
    let (u, g) = user.trim().split_once(':').expect("uid:gid");
    (u.parse().expect("uid"), g.parse().expect("gid"))
}

/// A workload's pod: runs as the image's user, probes liveness and readiness on nereid's paths
/// (with `scheme`), and reads its config where the ConfigMap is mounted; returns the config
/// file's name in the ConfigMap and the ConfigMap's name.
fn check_pod(workload: &Value, scheme: &str) -> (String, String) {
    let pod = &workload["spec"]["template"]["spec"];
    let (uid, gid) = image_user();
    assert_eq!(pod["securityContext"]["runAsUser"], uid);
    assert_eq!(pod["securityContext"]["runAsGroup"], gid);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/v1/health");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/v1/ready");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["scheme"].as_str().unwrap_or("HTTP"), scheme, "{probe}");
    }
    assert!(container["resources"]["requests"]["memory"].is_string(), "measured requests are set");
    let args: Vec<&str> = container["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    let config = args.iter().position(|a| *a == "--config").map(|i| args[i + 1]).expect("--config");
    let (dir, file) = config.rsplit_once('/').expect("a path");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let map = volume["configMap"]["name"].as_str().expect("a ConfigMap").to_string();
    (file.to_string(), map)
}

#[test]
fn the_manifests_render_validate_and_agree_with_nereid_and_its_image() {
    let dir = tempfile::tempdir().expect("tmp");
    let copy = Command::new("cp").arg("-r").arg(root().join("deploy/kubernetes")).arg(dir.path()).status();
    assert!(copy.expect("cp").success());
    let k8s = dir.path().join("kubernetes");

    // The TLS fleet, with the PKI and token its comments tell the operator to make.
    let fleet = k8s.join("overlays/tls-fleet");
    let nereid = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nereid")).args(args).current_dir(&fleet).output().expect("nereid");
        assert!(out.status.success(), "nereid {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let unmade = Command::new("kubectl").arg("kustomize").arg(&fleet).output().expect("kubectl");
    assert!(!unmade.status.success(), "the fleet overlay needs its PKI made first");
    nereid(&["cert", "ca", "--out", "pki"]);
    nereid(&["cert", "issue", "nereid-cloud", "--ca", "pki", "--san", "nereid-cloud.nereid.svc"]);
    nereid(&["cert", "issue", "nereid-inference", "--ca", "pki", "--san", "nereid-inference.nereid.svc"]);
    std::fs::write(fleet.join("admin-token"), "an-admin-token-for-the-test\n").expect("token");
    let objects = render(&fleet);

    let cloud = find(&objects, "StatefulSet", "nereid-cloud");
    assert_eq!(cloud["spec"]["replicas"], 1, "one writer of the SQLite state");
    let claim = &cloud["spec"]["volumeClaimTemplates"][0];
    let state_mount = cloud["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == claim["metadata"]["name"])
        .expect("the claim is mounted")["mountPath"]
        .as_str()
        .expect("path")
        .to_string();
    let (file, map) = check_pod(cloud, "HTTPS");
    let config: CloudConfig =
        toml::from_str(find(&objects, "ConfigMap", &map)["data"][&file].as_str().expect("cloud.toml"))
            .expect("the cloud's config is one nereid reads");
    assert!(config.state.starts_with(&state_mount), "the state on the claim: {:?}", config.state);
    assert!(config.tls.is_some());
    let service = find(&objects, "Service", "nereid-cloud");
    assert_eq!(service["spec"]["ports"][0]["port"], 7000);

    let edge = find(&objects, "DaemonSet", "nereid-edge");
    let pod = &edge["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["node-role.kubernetes.io/edge"], "", "on KubeEdge's edge nodes");
    assert!(pod["tolerations"]
        .as_array()
        .expect("tolerations")
        .iter()
        .any(|t| t["key"] == "node-role.kubernetes.io/edge"));
    let (file, map) = check_pod(edge, "HTTPS");
    let config: EdgeConfig =
        toml::from_str(find(&objects, "ConfigMap", &map)["data"][&file].as_str().expect("edge.toml"))
            .expect("the edge's config is one nereid reads");
    let name_env = config.name_env.expect("the node's name from the pod");
    let env = pod["containers"][0]["env"].as_array().expect("env");
    let var = env.iter().find(|e| e["name"] == name_env.as_str()).expect("the variable is set");
    assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert!(config.cloud.starts_with("https://nereid-cloud.nereid.svc:"), "{}", config.cloud);

    // The split-inference tier: a Deployment under an autoscaler, its state the pod's own.
    let tier = find(&objects, "Deployment", "nereid-inference");
    let (file, map) = check_pod(tier, "HTTPS");
    let config: CloudConfig = toml::from_str(find(&objects, "ConfigMap", &map)["data"][&file].as_str().expect("toml"))
        .expect("the tier's config is one nereid reads");
    assert!(!config.services.is_empty() && config.models.is_some(), "it serves models");
    let pod = &tier["spec"]["template"]["spec"];
    let state_dir = config.state.parent().expect("a directory").to_str().expect("utf-8");
    let state_volume = pod["containers"][0]["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == state_dir)
        .expect("the state directory is mounted")["name"]
        .clone();
    let volume =
        pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == state_volume).expect("volume");
    assert!(volume["emptyDir"].is_object(), "nothing a tail does is kept: {volume}");
    assert!(pod["containers"][0]["resources"]["requests"]["cpu"].is_string(), "the autoscaler's basis");
    let hpa = find(&objects, "HorizontalPodAutoscaler", "nereid-inference");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "nereid-inference");

    // The demo: `nereid demo` as a Job, nothing to make first.
    let objects = render(&k8s.join("overlays/loopback-demo"));
    let job = find(&objects, "Job", "nereid-demo");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0], "demo");
    assert_eq!(job["spec"]["template"]["spec"]["securityContext"]["runAsUser"], image_user().0);
}
