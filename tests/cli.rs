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
        2
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
