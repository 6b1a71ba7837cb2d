//! The real `coral` binary, run as a user would.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn coral(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coral"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("coral runs")
}

fn coral_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_coral"))
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("coral runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("coral exits")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(root().join("tests/data").join(name)).expect("fixture");
    serde_json::from_str(&text).expect("json fixture")
}

fn write_temp(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string(value).expect("json")).expect("write");
    path.display().to_string()
}

#[test]
fn image_key_prints_normalized_reference_and_label() {
    let output = coral(&["image", "key", "nginx:1.27", "localhost:5000/app"]);
    assert!(output.status.success(), "{}", stderr(&output));
    // printf 'localhost:5000/app:latest' | sha256sum | cut -c1-40
    assert_eq!(
        stdout(&output),
        "docker.io/library/nginx:1.27\timage.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c\n\
         localhost:5000/app:latest\timage.coral.dev/ee5a8f9657d6c547e65e15befe07a3bb84574646\n"
    );
}

#[test]
fn image_key_json_output() {
    let output = coral(&[
        "image",
        "key",
        "-o",
        "json",
        "index.docker.io/library/nginx:1.27",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: Value = serde_json::from_str(&stdout(&output)).expect("json");
    assert_eq!(
        value,
        json!([{
            "reference": "index.docker.io/library/nginx:1.27",
            "normalized": "docker.io/library/nginx:1.27",
            "label": "image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c",
        }])
    );
}

#[test]
fn image_key_rejects_invalid_reference() {
    let output = coral(&["image", "key", "nginx", "Nginx:1.0", "-o", "json"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty(), "nothing printed on error");
    assert!(
        stderr(&output).contains("must be lower case"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn crd_output_equals_the_committed_crds() {
    let output = coral(&["crd"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("crds"))
        .expect("crds/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let committed: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read crd"))
        .collect();
    assert!(
        stdout(&output) == committed,
        "crds/ differs from `coral crd`: run `just generate` and commit the result"
    );
    assert_eq!(
        committed.matches("kind: CustomResourceDefinition").count(),
        3
    );
}

#[test]
fn default_policy_tests_pass_with_full_coverage() {
    let output = coral(&[
        "policy",
        "test",
        "policies/",
        "policy-tests/",
        "--coverage",
        "--threshold",
        "100",
    ]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    assert!(text.contains("total: 100.0%"), "{text}");
    let summary = text.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("PASS: ") && !text.contains("FAIL"),
        "{text}"
    );
}

#[test]
fn failing_policy_tests_report_fail_and_error_and_exit_1() {
    let output = coral(&["policy", "test", "tests/data/failing-suite"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("data.demo_test.test_double_fails: FAIL"),
        "{text}"
    );
    assert!(text.contains("data.demo_test.test_errors: ERROR"), "{text}");
    assert!(
        !text.contains("test_double_passes"),
        "passes only shown with -v: {text}"
    );
    assert!(
        text.ends_with("PASS: 1/3\nFAIL: 1/3\nERROR: 1/3\n"),
        "{text}"
    );

    let verbose = stdout(&coral(&[
        "policy",
        "test",
        "-v",
        "tests/data/failing-suite",
    ]));
    assert!(
        verbose.contains("data.demo_test.test_double_passes: PASS"),
        "{verbose}"
    );
}

#[test]
fn policy_test_run_filter_and_json_format() {
    let output = coral(&[
        "policy",
        "test",
        "tests/data/failing-suite",
        "--run",
        "double_pass",
        "--format",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: Value = serde_json::from_str(&stdout(&output)).expect("json");
    let tests = value.as_array().expect("array");
    assert_eq!(tests.len(), 1);
    assert_eq!(tests[0]["name"], "test_double_passes");
    assert_eq!(tests[0]["package"], "data.demo_test");
    assert_eq!(tests[0]["location"]["row"], 5);
    assert!(tests[0].get("fail").is_none());

    let failing = coral(&[
        "policy",
        "test",
        "tests/data/failing-suite",
        "--format",
        "json",
    ]);
    let value: Value = serde_json::from_str(&stdout(&failing)).expect("json");
    assert_eq!(value[1]["fail"], true);
    assert!(value[2]["error"]["message"].is_string());
}

#[test]
fn policy_test_coverage_json_and_threshold() {
    let output = coral(&[
        "policy",
        "test",
        "tests/data/failing-suite",
        "--run",
        "double_pass",
        "--coverage",
        "--format",
        "json",
    ]);
    let value: Value = serde_json::from_str(&stdout(&output)).expect("json");
    let file = &value["files"]["tests/data/failing-suite/policy.rego"];
    assert_eq!(file["coverage"], 100.0, "{value}");

    // The preferred-scheduling tests alone leave the nodeSelector rules uncovered.
    let partial = coral(&[
        "policy",
        "test",
        "policies",
        "policy-tests",
        "--run",
        "preferred",
        "--coverage",
        "--threshold",
        "100",
    ]);
    assert_eq!(partial.status.code(), Some(1));
    assert!(
        stderr(&partial).contains("below the threshold"),
        "{}",
        stderr(&partial)
    );
    assert!(
        stdout(&partial).contains("not covered:"),
        "{}",
        stdout(&partial)
    );
}

#[test]
fn policy_test_reports_syntax_errors_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bad_test.rego"),
        "package x\n\ntest_a if { 1 = = 1 }\n",
    )
    .expect("write");
    let output = coral(&["policy", "test", dir.path().to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("bad_test.rego:3"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn eval_annotated_deployment_gets_selector_and_pull_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Made with `kubectl create deployment web --image=nginx:1.27 --dry-run=client -o json`.
    let mut deployment = fixture("deployment-web.json");
    deployment["metadata"]["annotations"] = json!({"coral.dev/inject": "selectors,pull-policy"});
    let file = write_temp(dir.path(), "web.json", &deployment);
    let state = json!({
        "imageSets": [{"metadata": {"name": "web", "namespace": "shop"}, "spec": {"images": ["nginx:1.27"]}}],
        "nodes": [
            {"name": "a", "images": ["nginx:1.27"]},
            {"name": "b", "images": ["docker.io/library/nginx:1.27"]},
            {"name": "c"},
        ],
    });
    let state = write_temp(dir.path(), "state.json", &state);
    let output = coral(&[
        "policy", "eval", "-f", &file, "--state", &state, "-o", "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let decision: Value = serde_json::from_str(&stdout(&output)).expect("json");
    assert_eq!(decision["allowed"], true);
    assert_eq!(
        decision["object"]["spec"]["template"]["spec"]["nodeSelector"],
        json!({"image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c": "available"})
    );
    assert_eq!(
        decision["object"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    let mut patched = deployment.clone();
    let patch: json_patch::Patch =
        serde_json::from_value(decision["patch"].clone()).expect("RFC 6902 patch");
    json_patch::patch(&mut patched, &patch).expect("patch applies");
    assert_eq!(patched, decision["object"]);
    assert_eq!(decision["warnings"], json!([]));
    assert_eq!(decision["denials"], json!([]));

    // The same Deployment without the annotation is left unchanged.
    let plain = write_temp(dir.path(), "plain.json", &fixture("deployment-web.json"));
    let output = coral(&[
        "policy", "eval", "-f", &plain, "--state", &state, "-o", "json",
    ]);
    let decision: Value = serde_json::from_str(&stdout(&output)).expect("json");
    assert_eq!(decision["patch"], json!([]));
    assert_eq!(decision["object"], fixture("deployment-web.json"));
}

#[test]
fn eval_reads_stdin_yaml_and_prints_a_diff() {
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: api\n  annotations: {coral.dev/inject: selectors}\nspec:\n  containers:\n  - {name: web, image: nginx:1.27}\n";
    let output = coral_stdin(
        &[
            "policy",
            "eval",
            "-f",
            "-",
            "--state",
            "examples/state.yaml",
            "-o",
            "diff",
            "-n",
            "shop",
        ],
        yaml,
    );
    let text = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        text.starts_with("Pod shop/api: 1 change(s)\n--- original\n+++ patched\n"),
        "{text}"
    );
    assert!(text.contains("+  nodeSelector:\n+    image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c: available\n"), "{text}");
}

#[test]
fn eval_accepts_an_admission_review_and_yaml_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pod = fixture("pod-api.json");
    pod["metadata"]["annotations"] = json!({"coral.dev/inject": "pull-policy"});
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": pod,
        }
    });
    let file = write_temp(dir.path(), "review.json", &review);
    let output = coral(&[
        "policy",
        "eval",
        "-f",
        &file,
        "--state",
        "examples/state.yaml",
        "-o",
        "yaml",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let decision: Value = serde_yaml::from_str(&stdout(&output)).expect("yaml");
    // migrate:1.0 and nginx:1.27 are available in the example state; api:1.4 is not managed.
    assert_eq!(
        decision["object"]["spec"]["initContainers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(
        decision["object"]["spec"]["containers"][1]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(
        decision["object"]["spec"]["containers"][0]["imagePullPolicy"],
        "Always"
    );
    assert!(
        decision["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .contains("ghcr.io/example/api:1.4")
    );
}

#[test]
fn eval_with_policies_from_a_configmap_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configmap = dir.path().join("cm.yaml");
    std::fs::write(
        &configmap,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\ndata:\n  deny.rego: |\n    package coral.mutate\n    deny contains \"no pods today\" if input.kind.kind == \"Pod\"\n",
    )
    .expect("write");
    let file = write_temp(dir.path(), "pod.json", &fixture("pod-api.json"));
    let output = coral(&[
        "policy",
        "eval",
        "-f",
        &file,
        "--state",
        "examples/state.yaml",
        "--policies",
        configmap.to_str().expect("utf-8"),
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let decision: Value = serde_json::from_str(&stdout(&output)).expect("json");
    assert_eq!(decision["allowed"], false);
    assert_eq!(decision["denials"], json!(["no pods today"]));
}

#[test]
fn eval_errors_are_clear_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = write_temp(
        dir.path(),
        "svc.json",
        &json!({"apiVersion": "v1", "kind": "Service"}),
    );
    let pod = write_temp(dir.path(), "pod.json", &fixture("pod-api.json"));
    let bad_policies = dir.path().join("policies");
    std::fs::create_dir(&bad_policies).expect("mkdir");
    std::fs::write(
        bad_policies.join("x.rego"),
        "package coral.mutate\nwarn contains x if { x := := 1 }\nok := true\n",
    )
    .expect("write");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-f", &service, "--state", "examples/state.yaml"],
            "unsupported object v1/Service",
        ),
        (
            vec!["-f", "/nonexistent.json", "--state", "examples/state.yaml"],
            "cannot read /nonexistent.json",
        ),
        (
            vec!["-f", &pod, "--state", "/nonexistent.yaml"],
            "cannot read state file /nonexistent.yaml",
        ),
        (
            vec![
                "-f",
                &pod,
                "--state",
                "examples/state.yaml",
                "--policies",
                bad_policies.to_str().expect("utf-8"),
            ],
            "x.rego:2",
        ),
        (
            vec![
                "-f",
                &pod,
                "--state",
                "examples/state.yaml",
                "--allowed-path",
                "spec",
            ],
            "invalid allowed path",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["policy", "eval"];
        full.extend(args.iter().copied());
        let output = coral(&full);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn examples_are_valid() {
    let text = std::fs::read_to_string(root().join("examples/imageset.yaml")).expect("example");
    let set: coral::api::ImageSet = serde_yaml::from_str(&text).expect("ImageSet");
    coral::index::validate_image_set(&set.spec).expect("valid ImageSet");
    coral::index::StateFile::load(&root().join("examples/state.yaml")).expect("valid state");
}

#[test]
fn demo_shows_changes_warnings_and_unchanged_workloads() {
    let output = coral(&["demo"]);
    let text = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    // Through the real webhook over HTTPS, not an in-process evaluation.
    assert!(
        text.contains("the admission webhook, standalone on https://127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains("POST /mutate as an AdmissionReview"),
        "{text}"
    );
    assert!(text.contains("Deployment shop/shop: 4 change(s)"), "{text}");
    assert!(
        text.contains("+        imagePullPolicy: IfNotPresent"),
        "{text}"
    );
    assert!(text.contains("CronJob shop/report: 2 change(s)"), "{text}");
    assert!(
        text.contains(
            "warning: container \"api\": image \"ghcr.io/example/api:1.4\" is not managed"
        ),
        "{text}"
    );
    assert!(text.contains("Deployment shop/legacy: unchanged"), "{text}");
    // Placement safety: its own nodeSelector keeps nginx out, with the reason.
    assert!(
        text.contains("warning: container \"proxy\": image \"nginx:1.27\" not steered to: 3 node(s) hold it, 0 of them usable by this pod (0 cordoned, 1 with taints it does not tolerate, 2 outside its nodeSelector, node affinity or nodeName)"),
        "{text}"
    );
}

/// The files of `dir` with one of the extensions, by name.
fn files_in(dir: &str, extension: &str) -> BTreeMap<String, String> {
    std::fs::read_dir(root().join(dir))
        .expect("directory")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == extension).then(|| {
                let name = path.file_name()?.to_string_lossy().into_owned();
                Some((name, std::fs::read_to_string(&path).ok()?))
            })?
        })
        .collect()
}

#[test]
fn deploy_carries_the_crds_and_the_policies_unchanged() {
    assert_eq!(
        files_in("deploy/base/crds", "yaml"),
        files_in("crds", "yaml"),
        "deploy/base/crds differs from crds/: run `just generate`"
    );
    let policies = files_in("policies", "rego");
    assert_eq!(
        files_in("deploy/base/policies", "rego"),
        policies,
        "deploy/base/policies differs from policies/: run `just generate`"
    );
    // The ConfigMap generator lists every policy file.
    let kustomization =
        std::fs::read_to_string(root().join("deploy/base/kustomization.yaml")).expect("read");
    for name in policies.keys() {
        assert!(
            kustomization.contains(&format!("- policies/{name}")),
            "{name} is missing from deploy/base/kustomization.yaml"
        );
    }
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_coral"))
        .arg("crd")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("coral starts");
    // Close the reading end before coral writes, as `coral crd | head -0` would.
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("coral ends");
    assert_eq!(output.status.code(), Some(141), "{}", stderr(&output));
    assert!(output.stderr.is_empty(), "{}", stderr(&output));
}

/// A node of `tests/data/placement/state.yaml`, as the scheduler would see it.
struct JudgedNode {
    name: String,
    labels: BTreeMap<String, String>,
    taints: Vec<Value>,
    unschedulable: bool,
}

/// The nodes of a state file, with the label the agent sets for each image they hold.
fn judged_nodes(state: &str) -> Vec<JudgedNode> {
    let state: Value = serde_yaml::from_str(state).expect("state");
    state["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|node| {
            let mut labels: BTreeMap<String, String> =
                serde_json::from_value(node.get("labels").cloned().unwrap_or(json!({})))
                    .expect("labels");
            for image in node
                .get("images")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                labels.insert(label_of(image.as_str().expect("image")), "available".into());
            }
            JudgedNode {
                name: node["name"].as_str().expect("name").into(),
                labels,
                taints: node
                    .get("taints")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                unschedulable: node.get("unschedulable") == Some(&json!(true)),
            }
        })
        .collect()
}

fn label_of(image: &str) -> String {
    coral::image::label_key(&coral::image::ImageReference::parse(image).expect("reference"))
}

/// The nodes a pod spec could be scheduled on, judged here independently of Coral: every
/// nodeSelector entry, required node-affinity terms (In and NotIn), taints with effect
/// NoSchedule or NoExecute against tolerations, and cordoned nodes.
fn schedulable_on(spec: &Value, nodes: &[JudgedNode]) -> Vec<String> {
    let tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    let tolerated = |key: &str, value: &str, effect: &str| {
        tolerations.iter().any(|t| {
            let field = |f: &str| t[f].as_str().unwrap_or("");
            (field("effect").is_empty() || field("effect") == effect)
                && (field("key").is_empty() || field("key") == key)
                && (field("operator") == "Exists" || field("value") == value)
        })
    };
    let terms = spec
        .pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array)
        .cloned();
    nodes
        .iter()
        .filter(|node| {
            let selector_ok = spec["nodeSelector"]
                .as_object()
                .into_iter()
                .flatten()
                .all(|(k, v)| node.labels.get(k).map(String::as_str) == v.as_str());
            let affinity_ok = terms.as_ref().is_none_or(|terms| {
                terms.iter().any(|term| {
                    term["matchExpressions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .all(|e| {
                            let values: Vec<&str> = e["values"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(Value::as_str)
                                .collect();
                            let value = node.labels.get(e["key"].as_str().unwrap_or(""));
                            match e["operator"].as_str() {
                                Some("In") => value.is_some_and(|v| values.contains(&v.as_str())),
                                Some("NotIn") => {
                                    value.is_none_or(|v| !values.contains(&v.as_str()))
                                }
                                other => panic!("the judge does not know {other:?}"),
                            }
                        })
                })
            });
            let taints_ok = node.taints.iter().all(|t| {
                let effect = t["effect"].as_str().unwrap_or("");
                !matches!(effect, "NoSchedule" | "NoExecute")
                    || tolerated(
                        t["key"].as_str().unwrap_or(""),
                        t["value"].as_str().unwrap_or(""),
                        effect,
                    )
            });
            let cordon_ok = !node.unschedulable
                || tolerated("node.kubernetes.io/unschedulable", "", "NoSchedule");
            selector_ok && affinity_ok && taints_ok && cordon_ok
        })
        .map(|node| node.name.clone())
        .collect()
}

/// `coral policy eval` of a Deployment running `images`, with `pod_spec` merged into its pod
/// spec, against `state`: the decision, and the nodes its pod template can be scheduled on.
fn eval_placement(
    state: &str,
    images: &[&str],
    pod_spec: Value,
    inject: Option<&str>,
) -> (Value, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut deployment = fixture("deployment-web.json");
    let spec = &mut deployment["spec"]["template"]["spec"];
    spec["containers"] = Value::Array(
        images
            .iter()
            .enumerate()
            .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
            .collect(),
    );
    for (key, value) in pod_spec.as_object().expect("pod spec") {
        spec[key] = value.clone();
    }
    if let Some(inject) = inject {
        deployment["metadata"]["annotations"] = json!({"coral.dev/inject": inject});
    }
    let file = write_temp(dir.path(), "deployment.json", &deployment);
    let state_path = dir.path().join("state.yaml");
    std::fs::write(&state_path, state).expect("write");
    let output = coral(&[
        "policy",
        "eval",
        "-f",
        &file,
        "--state",
        state_path.to_str().expect("utf-8"),
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let decision: Value = serde_json::from_str(&stdout(&output)).expect("json");
    // The patch is what the API server applies: judge the object it produces.
    let patch: json_patch::Patch =
        serde_json::from_value(decision["patch"].clone()).expect("RFC 6902 patch");
    json_patch::patch(&mut deployment, &patch).expect("patch applies");
    assert_eq!(deployment, decision["object"]);
    let nodes = schedulable_on(
        &deployment["spec"]["template"]["spec"],
        &judged_nodes(state),
    );
    (decision, nodes)
}

fn placement_state() -> String {
    std::fs::read_to_string(root().join("tests/data/placement/state.yaml")).expect("state")
}

fn node_selector(decision: &Value) -> Value {
    decision["object"]["spec"]["template"]["spec"]
        .get("nodeSelector")
        .cloned()
        .unwrap_or(json!({}))
}

fn warnings(decision: &Value) -> String {
    decision["warnings"].to_string()
}

#[test]
fn placement_images_on_different_nodes_leave_the_pod_somewhere_to_run() {
    let (decision, nodes) = eval_placement(
        &placement_state(),
        &["nginx:1.27", "redis:7.4"],
        json!({}),
        Some("selectors,pull-policy"),
    );
    assert_eq!(nodes.len(), 1, "{nodes:?}: {decision}");
    assert_eq!(
        node_selector(&decision)
            .as_object()
            .expect("selector")
            .len(),
        1
    );
    assert!(warnings(&decision).contains("not steered to"), "{decision}");
}

#[test]
fn placement_respects_the_pods_own_node_selector_and_affinity() {
    let in_db = json!({"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["db"]}]},
    ]}});
    for pod_spec in [
        json!({"nodeSelector": {"pool": "db"}}),
        json!({"affinity": {"nodeAffinity": in_db}}),
    ] {
        let (decision, nodes) = eval_placement(
            &placement_state(),
            &["nginx:1.27"],
            pod_spec.clone(),
            Some("selectors"),
        );
        assert_eq!(nodes, ["db-a"], "{pod_spec}: {decision}");
        assert!(
            warnings(&decision).contains("1 outside its nodeSelector, node affinity or nodeName"),
            "{decision}"
        );
    }
}

#[test]
fn placement_an_image_on_untolerated_tainted_or_cordoned_nodes_only_is_not_steered_to() {
    for (image, reason) in [
        ("busybox:1.36", "1 with taints it does not tolerate"),
        ("alpine:3.20", "(1 cordoned,"),
    ] {
        let (decision, nodes) = eval_placement(
            &placement_state(),
            &[image],
            json!({}),
            Some("selectors,pull-policy"),
        );
        assert_eq!(nodes, ["web-a", "web-b", "db-a"], "{image}: {decision}");
        assert!(warnings(&decision).contains(reason), "{image}: {decision}");
    }
}

#[test]
fn placement_a_tolerated_taint_keeps_the_label() {
    let tolerate = json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]});
    let (decision, nodes) = eval_placement(
        &placement_state(),
        &["busybox:1.36"],
        tolerate,
        Some("selectors,pull-policy"),
    );
    assert_eq!(nodes, ["gpu-a"], "{decision}");
    assert_eq!(
        node_selector(&decision),
        json!({label_of("busybox:1.36"): "available"})
    );
}

#[test]
fn placement_a_node_holding_every_image_gets_every_label() {
    let (decision, nodes) = eval_placement(
        &placement_state(),
        &["nginx:1.27", "nginx:1.28"],
        json!({}),
        Some("selectors"),
    );
    assert_eq!(nodes, ["web-a"], "{decision}");
    assert_eq!(
        node_selector(&decision),
        json!({label_of("nginx:1.27"): "available", label_of("nginx:1.28"): "available"})
    );
}

#[test]
fn placement_an_updated_image_does_not_keep_its_old_key() {
    // kubectl set image nginx:1.27 -> nginx:1.28 leaves the 1.27 key in the template.
    let stale = json!({"nodeSelector": {"pool": "web", label_of("nginx:1.27"): "available"}});
    // Steered to 1.28 with selectors injected; without, only the stale key goes.
    for (inject, expected) in [
        (Some("selectors"), vec!["web-a"]),
        (None, vec!["web-a", "web-b"]),
    ] {
        let (decision, nodes) =
            eval_placement(&placement_state(), &["nginx:1.28"], stale.clone(), inject);
        assert_eq!(nodes, expected, "{inject:?}: {decision}");
        assert!(
            node_selector(&decision)
                .get(label_of("nginx:1.27"))
                .is_none(),
            "{decision}"
        );
    }
}

#[test]
fn placement_keys_of_an_image_no_longer_managed_go() {
    let state = placement_state().replace(
        "\"nginx:1.27\", \"nginx:1.28\", \"redis",
        "\"nginx:1.28\", \"redis",
    );
    assert_ne!(state, placement_state());
    let keyed = json!({"nodeSelector": {label_of("nginx:1.27"): "available"}});
    let (decision, nodes) = eval_placement(&state, &["nginx:1.27"], keyed, None);
    assert_eq!(nodes, ["web-a", "web-b", "db-a"], "{decision}");
    assert_eq!(node_selector(&decision), json!({}));
}

#[test]
fn state_file_taints_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state =
        json!({"nodes": [{"name": "g", "taints": [{"key": "gpu", "effect": "Sometimes"}]}]});
    let state = write_temp(dir.path(), "state.json", &state);
    let file = write_temp(dir.path(), "web.json", &fixture("deployment-web.json"));
    let output = coral(&["policy", "eval", "-f", &file, "--state", &state]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("node \"g\": taints[0]: unknown effect \"Sometimes\""),
        "{}",
        stderr(&output)
    );
}

#[test]
fn policy_test_loads_data_files_as_opa_test_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("team")).expect("mkdir");
    std::fs::write(
        dir.path().join("limits_test.rego"),
        "package limits\n\ntest_root if data.max == 3\n\ntest_nested if data.team.name == \"a\"\n\ntest_no_coral_defaults if not data.coral\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("data.json"), r#"{"max": 3}"#).expect("write");
    std::fs::write(dir.path().join("team/data.yaml"), "name: a\n").expect("write");
    let output = coral(&["policy", "test", dir.path().to_str().expect("utf-8"), "-v"]);
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(stdout(&output).contains("PASS: 3/3"), "{}", stdout(&output));

    // Two files defining one value is an error, as under opa test.
    std::fs::write(dir.path().join("team/data.json"), r#"{"name": "b"}"#).expect("write");
    let output = coral(&["policy", "test", dir.path().to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("data.team.name is already defined by another data file"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_policy_tests_data_file_holds_the_default_settings() {
    let text = std::fs::read_to_string(root().join("policy-tests/data.json")).expect("data.json");
    let data: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        data["coral"]["settings"],
        serde_json::to_value(coral::policy::Settings::default()).expect("settings"),
        "policy-tests/data.json must hold the defaults of settings.json"
    );
}

/// A workload manifest whose pod template carries these nodeSelector entries.
fn workload(kind: &str, name: &str, selector: Value) -> Value {
    let mut object = fixture("deployment-web.json");
    object["kind"] = json!(kind);
    object["metadata"]["name"] = json!(name);
    object["metadata"]["namespace"] = json!("shop");
    object["spec"]["template"]["spec"]["nodeSelector"] = selector;
    object
}

#[test]
fn audit_lists_stranded_workloads_from_a_state_file_and_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let both = json!({label_of("nginx:1.27"): "available", label_of("redis:7.4"): "available"});
    let nginx = json!({label_of("nginx:1.27"): "available"});
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("mkdir");
    write_temp(
        &manifests,
        "both.json",
        &workload("Deployment", "both", both),
    );
    write_temp(
        &manifests,
        "fine.json",
        &workload("Deployment", "fine", nginx.clone()),
    );
    // A YAML stream: a List holding a StatefulSet on the cordoned node's image, and a
    // ReplicaSet its Deployment owns (judged through its owner, not itself).
    let cordoned = workload(
        "StatefulSet",
        "old",
        json!({label_of("alpine:3.20"): "available"}),
    );
    let mut owned = workload(
        "ReplicaSet",
        "both-123",
        json!({label_of("alpine:3.20"): "available"}),
    );
    owned["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "both", "uid": "u", "controller": true}]);
    let stream = format!(
        "{}\n---\n{}\n",
        serde_yaml::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": [cordoned]}))
            .expect("yaml"),
        serde_yaml::to_string(&owned).expect("yaml"),
    );
    std::fs::write(manifests.join("more.yaml"), stream).expect("write");
    let state = "tests/data/placement/state.yaml";
    let dir_arg = manifests.to_str().expect("utf-8");

    let output = coral(&["audit", "--state", state, "-f", dir_arg]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let text = stdout(&output);
    assert!(
        text.contains("Deployment shop/both: its pod template requires"),
        "{text}"
    );
    assert!(text.contains("StatefulSet shop/old: its pod template requires docker.io/library/alpine:3.20 on 1 node(s), 0 usable; 0 schedulable node(s) satisfy it, 1 needed"), "{text}");
    assert!(!text.contains("shop/fine"), "{text}");
    assert!(!text.contains("both-123"), "{text}");
    assert!(
        text.contains("2 stranded workload(s) of 4 checked"),
        "{text}"
    );

    let output = coral(&["audit", "--state", state, "-f", dir_arg, "-o", "json"]);
    let found: Value = serde_json::from_str(&stdout(&output)).expect("json");
    let names: Vec<&str> = found
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["both", "old"]);
    assert_eq!(found[0]["nodes"], 0);

    // minAvailableNodes 2: nginx alone is on one node only, so `fine` is stranded too.
    let output = coral(&[
        "audit",
        "--state",
        state,
        "-f",
        dir_arg,
        "--min-available-nodes",
        "2",
    ]);
    assert!(
        stdout(&output).contains("Deployment shop/fine"),
        "{}",
        stdout(&output)
    );

    // Nothing stranded: exit 0. The audit cannot run: exit 2 with the reason.
    let fine = write_temp(
        dir.path(),
        "fine.json",
        &workload("Deployment", "fine", nginx),
    );
    let output = coral(&["audit", "--state", state, "-f", &fine]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("no stranded workloads (1 workload(s) checked against 5 node(s))")
    );
    let output = coral(&["audit", "--state", state]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--state needs the workloads to audit"),
        "{}",
        stderr(&output)
    );
    let output = coral(&["audit", "--state", state, "-f", "no/such/file.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("cannot read no/such/file.yaml"),
        "{}",
        stderr(&output)
    );
}

/// Each error says each thing once: no `: `-separated clause of the printed error comes twice.
#[test]
fn no_error_repeats_a_clause() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let bad_set = write(
        "bad-set.yaml",
        "imageSets:\n  - metadata: {name: rw-0, namespace: rw}\n    spec: {images: [\"Bad/Ref:1\"]}\n",
    );
    let bad_node = write(
        "bad-node.yaml",
        "nodes:\n  - {name: a, images: [\"UPPER:1\"]}\n",
    );
    let bad_json = write("bad.json", "{\"nodes\": [{\"name\": 5}]}");
    let bad_settings = write("bad-settings.yaml", "settings: {preferredWeight: 500}\n");
    let workload = write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: nginx}]}\n",
    );
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("broken.rego"),
        "package coral.mutate\npatch contains x if {\n",
    )
    .unwrap();
    let policies = policies.display().to_string();
    let good_state = root().join("examples/state.yaml").display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    let webhook = |state: &str| -> Vec<String> {
        let flags = [
            "--tls-cert",
            &missing,
            "--tls-key",
            &missing,
            "--listen",
            "127.0.0.1:0",
        ];
        [
            "webhook",
            "--standalone",
            "--probe-listen",
            "127.0.0.1:0",
            "--state",
            state,
        ]
        .into_iter()
        .chain(flags)
        .map(String::from)
        .collect()
    };
    let (webhook_bad, webhook_good) = (webhook(&bad_set), webhook(&good_state));
    let cases: Vec<Vec<&str>> = vec![
        vec!["policy", "eval", "-f", &workload, "--state", &bad_set],
        vec!["policy", "eval", "-f", &workload, "--state", &bad_node],
        vec!["policy", "eval", "-f", &workload, "--state", &bad_json],
        vec!["policy", "eval", "-f", &workload, "--state", &bad_settings],
        vec![
            "policy",
            "eval",
            "-f",
            &workload,
            "--state",
            &good_state,
            "--policies",
            &policies,
        ],
        vec!["policy", "test", &policies],
        vec!["audit", "--state", &bad_set, "-f", &workload],
        vec!["image", "key", "Bad/Ref:1"],
        webhook_bad.iter().map(String::as_str).collect(),
        webhook_good.iter().map(String::as_str).collect(),
    ];
    for args in cases {
        let output = coral(&args);
        assert!(!output.status.success(), "{args:?} should fail");
        let text = stderr(&output);
        let line = text
            .lines()
            .find(|line| line.starts_with("error: ") || line.contains("error:"))
            .unwrap_or_else(|| panic!("{args:?}: no error line in {text}"));
        let clauses: Vec<&str> = line
            .split(": ")
            .map(str::trim)
            .filter(|c| c.len() > 3)
            .collect();
        for (i, clause) in clauses.iter().enumerate() {
            assert!(
                !clauses[i + 1..].contains(clause),
                "{args:?}: {clause:?} is said twice in\n{line}"
            );
        }
    }
}
