use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;
use crate::index::StateFile;

pub(crate) const STATE: &str = r#"
imageSets:
  - metadata: {name: web, namespace: shop}
    spec:
      images: ["nginx:1.27", "ghcr.io/example/api:1.4", "ghcr.io/example/migrate:1.0"]
      nodeSelector: {matchLabels: {pool: web}}
nodes:
  - {name: a, labels: {pool: web, kubernetes.io/os: linux}, images: ["nginx:1.27", "ghcr.io/example/api:1.4", "ghcr.io/example/migrate:1.0"]}
  - {name: b, labels: {pool: web, kubernetes.io/os: linux}, images: ["nginx:1.27"]}
  - {name: c, labels: {pool: batch, kubernetes.io/os: linux}}
namespaces:
  - {name: shop, labels: {coral.dev/inject: enabled}}
"#;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn evaluator_with(settings: Settings) -> Evaluator {
    let state = StateFile::parse(STATE, "test").expect("state");
    let policies = CompiledPolicies::compile(&PolicySet::embedded()).expect("compile");
    let data = coral_data(&state.to_index(), &settings);
    let evaluator =
        Evaluator::new(&policies, data, EvaluatorOptions::default()).expect("evaluator");
    assert!(
        evaluator.uses_vm(),
        "the default policies run on the compiled VM"
    );
    evaluator
}

/// The nodes of [`STATE`].
fn placement() -> crate::index::Placement {
    StateFile::parse(STATE, "test")
        .expect("state")
        .to_index()
        .placement()
}

fn decide(evaluator: &Evaluator, object: Value) -> Decision {
    let request = PolicyRequest::create(object, "shop").expect("request");
    evaluator
        .decide(&request, &BTreeMap::new(), &placement())
        .expect("decision")
}

fn annotate(mut object: Value, value: &str) -> Value {
    object["metadata"]["annotations"] = json!({"coral.dev/inject": value});
    object
}

const NGINX_LABEL: &str = "image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c";

#[test]
fn annotated_deployment_gets_node_selector_and_pull_policy() {
    let evaluator = evaluator_with(Settings::default());
    let object = annotate(fixture("deployment-web.json"), "selectors,pull-policy");
    let decision = decide(&evaluator, object);
    assert!(decision.allowed);
    let spec = &decision.object["spec"]["template"]["spec"];
    assert_eq!(spec["nodeSelector"], json!({NGINX_LABEL: "available"}));
    assert_eq!(spec["containers"][0]["imagePullPolicy"], "IfNotPresent");
    let ops = serde_json::to_value(&decision.patch).expect("patch");
    assert_eq!(ops.as_array().map(Vec::len), Some(2), "{ops}");
}

#[test]
fn deployment_without_annotation_is_left_unchanged() {
    let evaluator = evaluator_with(Settings::default());
    let object = fixture("deployment-web.json");
    let decision = decide(&evaluator, object.clone());
    assert!(decision.allowed);
    assert!(decision.patch.0.is_empty());
    assert_eq!(decision.object, object);
    assert!(decision.warnings.is_empty(), "{:?}", decision.warnings);
}

fn compile(files: &[(&str, &str)]) -> Result<CompiledPolicies, PolicyError> {
    CompiledPolicies::compile(&PolicySet {
        files: files
            .iter()
            .map(|(name, source)| PolicyFile {
                name: (*name).to_string(),
                source: (*source).to_string(),
            })
            .collect(),
        settings: Settings::default(),
        origin: "test".to_string(),
    })
}

fn custom_evaluator(rego: &str) -> Evaluator {
    let policies = compile(&[("custom.rego", rego)]).expect("compile");
    let data = coral_data(&crate::index::ClusterIndex::new(), &Settings::default());
    Evaluator::new(&policies, data, EvaluatorOptions::default()).expect("evaluator")
}

fn custom_error(rego: &str) -> PolicyError {
    let request = PolicyRequest::create(fixture("deployment-web.json"), "shop").expect("request");
    custom_evaluator(rego)
        .decide(&request, &BTreeMap::new(), &placement())
        .expect_err("the rails must reject this decision")
}

#[test]
fn pod_with_init_container_gets_selectors_for_all_available_images() {
    let evaluator = evaluator_with(Settings::default());
    let decision = decide(&evaluator, fixture("pod-api.json"));
    let spec = &decision.object["spec"];
    let selector = spec["nodeSelector"].as_object().expect("nodeSelector");
    assert_eq!(
        selector.len(),
        4,
        "os label kept, three images added: {selector:?}"
    );
    assert_eq!(selector["kubernetes.io/os"], "linux");
    assert_eq!(spec["initContainers"][0]["imagePullPolicy"], "IfNotPresent");
    assert_eq!(spec["containers"][0]["imagePullPolicy"], "IfNotPresent");
    assert_eq!(spec["containers"][1]["imagePullPolicy"], "IfNotPresent");
}

#[test]
fn cronjob_is_patched_at_its_nested_pod_spec() {
    let evaluator = evaluator_with(Settings::default());
    let object = annotate(fixture("cronjob-report.json"), "pull-policy");
    let decision = decide(&evaluator, object);
    // report:3 is not managed in this state: left alone, with a warning.
    assert!(decision.patch.0.is_empty());
    assert_eq!(decision.warnings.len(), 1, "{:?}", decision.warnings);
    assert!(decision.warnings[0].contains("not managed by any ImageSet"));
}

#[test]
fn preferred_scheduling_setting_adds_node_affinity() {
    let settings = Settings {
        scheduling: Scheduling::Preferred,
        ..Settings::default()
    };
    let evaluator = evaluator_with(settings);
    let decision = decide(
        &evaluator,
        annotate(fixture("deployment-web.json"), "selectors"),
    );
    let terms = &decision.object["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(terms[0]["weight"], 100);
    assert_eq!(
        terms[0]["preference"]["matchExpressions"][0]["key"],
        NGINX_LABEL
    );
    assert!(decision.object["spec"]["template"]["spec"]["nodeSelector"].is_null());
}

#[test]
fn final_patch_is_the_diff_and_applies_to_the_original() {
    let evaluator = evaluator_with(Settings::default());
    let original = annotate(fixture("pod-api.json"), "selectors,pull-policy");
    let decision = decide(&evaluator, original.clone());
    let mut applied = original;
    json_patch::patch(&mut applied, &decision.patch).expect("patch applies");
    assert_eq!(applied, decision.object);
}

#[test]
fn patch_outside_the_allowed_paths_is_rejected() {
    let error = custom_error(
        r#"package coral.mutate
patch contains {"op": "add", "path": "/spec/replicas", "value": 5}"#,
    );
    assert!(error.to_string().contains("path not allowed"), "{error}");
    assert!(error.to_string().contains("/spec/replicas"), "{error}");
    assert_eq!(error.metric_label(), "rail");
}

#[test]
fn two_operations_on_one_path_are_rejected() {
    let error = custom_error(
        r#"package coral.mutate
patch contains {"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {"a": "1"}}
patch contains {"op": "add", "path": "/spec/template/spec/nodeSelector/b", "value": "2"}"#,
    );
    assert!(
        error.to_string().contains("conflicting operations"),
        "{error}"
    );
}

#[test]
fn patch_that_breaks_the_kubernetes_type_is_rejected() {
    let error = custom_error(
        r#"package coral.mutate
patch contains {"op": "add", "path": "/spec/template/spec/nodeSelector", "value": ["not", "a", "map"]}"#,
    );
    assert!(
        error.to_string().contains("not a valid Kubernetes object"),
        "{error}"
    );
}

#[test]
fn patch_that_does_not_apply_is_rejected() {
    let error = custom_error(
        r#"package coral.mutate
patch contains {"op": "remove", "path": "/spec/template/spec/affinity"}"#,
    );
    assert!(
        error.to_string().contains("patch does not apply"),
        "{error}"
    );
}

#[test]
fn policies_that_never_converge_are_rejected() {
    // Each evaluation appends one more term: the object never stops changing.
    let error = custom_error(
        r#"package coral.mutate
terms := object.get(input.object, ["spec", "template", "spec", "nodeSelector"], {})
patch contains {"op": "add", "path": "/spec/template/spec/nodeSelector", "value": object.union(terms, {sprintf("k%d", [count(terms)]): "v"})}"#,
    );
    assert!(error.to_string().contains("do not converge"), "{error}");
}

#[test]
fn malformed_operation_is_rejected() {
    let error = custom_error(
        r#"package coral.mutate
patch contains {"op": "frobnicate", "path": "/metadata/annotations"}"#,
    );
    assert!(error.to_string().contains("malformed operation"), "{error}");
}

#[test]
fn deny_rule_denies_without_patching() {
    let evaluator = custom_evaluator(
        r#"package coral.mutate
deny contains "no latest tags" if { some c in input.containers; endswith(c.normalized, ":latest") }
patch contains {"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}}"#,
    );
    let mut object = fixture("deployment-web.json");
    object["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx".into();
    let decision = decide(&evaluator, object.clone());
    assert!(!decision.allowed);
    assert_eq!(decision.denials, vec!["no latest tags".to_string()]);
    assert!(decision.patch.0.is_empty());
    assert_eq!(decision.object, object);
}

#[test]
fn slow_policy_is_stopped_by_the_time_bound() {
    let policies = compile(&[(
        "slow.rego",
        r#"package coral.mutate
xs := numbers.range(1, 5000)
warn contains "never" if { some a in xs; some b in xs; a * b < 0 }"#,
    )])
    .expect("compile");
    let data = coral_data(&crate::index::ClusterIndex::new(), &Settings::default());
    let options = EvaluatorOptions {
        timeout: std::time::Duration::from_millis(50),
        ..EvaluatorOptions::default()
    };
    let evaluator = Evaluator::new(&policies, data, options).expect("evaluator");
    let request = PolicyRequest::create(fixture("deployment-web.json"), "shop").expect("request");
    let started = std::time::Instant::now();
    let error = evaluator
        .decide(&request, &BTreeMap::new(), &placement())
        .expect_err("must time out");
    assert_eq!(error.metric_label(), "timeout", "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// Held by every test that runs a runaway evaluation on purpose: one at a time, so that each is
/// stopped within its bounds on two cores, while the other tests run beside it.
pub(crate) fn runaway() -> std::sync::MutexGuard<'static, ()> {
    static RUNAWAY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RUNAWAY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Policies that blow up on every request, each a different way past the engine's own checks.
const BOMBS: [(&str, &str); 3] = [
    (
        "one builtin call allocating 2 GiB",
        "n := count([x | some x in numbers.range(1, 100000000)])\nwarn contains sprintf(\"%d\", [n]) if true",
    ),
    (
        "a comprehension growing between instructions",
        "xs := [sprintf(\"%d-%d\", [a, b]) | some a in numbers.range(1, 3000); some b in numbers.range(1, 3000)]\nwarn contains sprintf(\"%d\", [count(xs)]) if true",
    ),
    (
        "a builtin call on a value built in one instruction",
        "warn contains sprintf(\"%d\", [count(net.cidr_expand(\"10.0.0.0/8\"))]) if true",
    ),
];

#[test]
fn every_way_past_the_bounds_is_stopped_within_twice_the_limit() {
    let _one_at_a_time = runaway();
    let data = coral_data(&crate::index::ClusterIndex::new(), &Settings::default());
    let options = EvaluatorOptions::default();
    let request = PolicyRequest::create(fixture("deployment-web.json"), "shop").expect("request");
    for (what, rules) in BOMBS {
        let policies = compile(&[("bomb.rego", &format!("package coral.mutate\n{rules}\n"))])
            .expect("compiles");
        let evaluator =
            Evaluator::new(&policies, data.clone(), options.clone()).expect("evaluator");
        let started = std::time::Instant::now();
        let error = evaluator
            .decide(&request, &BTreeMap::new(), &placement())
            .expect_err(what);
        let took = started.elapsed();
        assert!(
            matches!(error, PolicyError::Timeout(_) | PolicyError::Memory(_)),
            "{what}: {error}"
        );
        assert!(took < options.timeout * 2, "{what}: {took:?}, {error}");
        eprintln!("{what}: {error} after {took:?}");
    }
}

#[test]
fn what_runs_beside_a_stopped_evaluation_is_whole() {
    // Stopping a runaway evaluation lowers a process-wide ceiling; compiles, evaluators and
    // decisions running meanwhile must neither fail nor quietly come out different (a data
    // document that does not convert, a policy that falls back to the interpreter).
    let _one_at_a_time = runaway();
    let data = coral_data(&crate::index::ClusterIndex::new(), &Settings::default());
    let request = PolicyRequest::create(fixture("deployment-web.json"), "shop").expect("request");
    let bombs: Vec<(&str, Evaluator)> = BOMBS
        .iter()
        .map(|(what, rules)| {
            let policies = compile(&[("bomb.rego", &format!("package coral.mutate\n{rules}\n"))])
                .expect("compiles");
            let evaluator = Evaluator::new(&policies, data.clone(), EvaluatorOptions::default())
                .expect("evaluator");
            (*what, evaluator)
        })
        .collect();
    let expected = decide(
        &evaluator_with(Settings::default()),
        fixture("deployment-web.json"),
    );
    std::thread::scope(|scope| {
        let stopping = scope.spawn(|| {
            for (what, bomb) in &bombs {
                bomb.decide(&request, &BTreeMap::new(), &placement())
                    .expect_err(what);
            }
        });
        let mut rounds = 0;
        while !stopping.is_finished() {
            let evaluator = evaluator_with(Settings::default());
            assert_eq!(
                decide(&evaluator, fixture("deployment-web.json")).patch,
                expected.patch,
                "round {rounds}"
            );
            rounds += 1;
        }
        stopping.join().expect("bomb thread");
        eprintln!("{rounds} rounds beside the stopped evaluations");
        assert!(rounds > 0);
    });
}

#[test]
fn brackets_nested_too_deep_are_refused_before_parsing() {
    // Found by the policy_configmap fuzz target: 48 unclosed brackets held the parser.
    let source = format!(
        "package coral.mutate\n\n# [[[[ in a comment\ninject_{} if true\n",
        "[".repeat(48)
    );
    let error = compile(&[("deep.rego", &source)]).expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("deep.rego:4: brackets nested deeper than 16"),
        "{error}"
    );
    let fine = format!(
        "package coral.mutate\n\nx := {}1{}\n",
        "[".repeat(12),
        "]".repeat(12)
    );
    compile(&[("fine.rego", &fine)]).expect("12 levels compile");
}

#[test]
fn syntax_error_names_the_file_and_line() {
    let error = compile(&[(
        "broken.rego",
        "package coral.mutate\n\npatch contains if {\n",
    )])
    .expect_err("must not compile");
    let message = error.to_string();
    assert!(message.contains("broken.rego:3"), "{message}");
}

#[test]
fn policy_set_without_the_decision_package_is_rejected() {
    let error = compile(&[("other.rego", "package other\nx := 1\n")]).expect_err("no package");
    assert!(
        error.to_string().contains("package coral.mutate"),
        "{error}"
    );
}

#[test]
fn unknown_function_is_reported_at_compile_time() {
    let error = compile(&[(
        "typo.rego",
        "package coral.mutate\nwarn contains x if { x := no_such_function(1) }\n",
    )])
    .expect_err("must not compile");
    assert!(error.to_string().contains("no_such_function"), "{error}");
}

#[test]
fn unsupported_kind_is_a_clear_error() {
    let error = PolicyRequest::create(json!({"apiVersion": "v1", "kind": "Service"}), "x")
        .expect_err("services are not workloads");
    assert!(
        error.to_string().contains("unsupported object v1/Service"),
        "{error}"
    );
}

#[test]
fn input_lists_every_container_with_pointer_and_normalized_image() {
    let object = fixture("pod-api.json");
    let mut object = object;
    object["spec"]["ephemeralContainers"] = json!([{"name": "debug", "image": "busybox"}]);
    object["spec"]["containers"][1]["image"] = "Not A Ref".into();
    let entries = containers(&object, WorkloadKind::Pod);
    let summary: Vec<(String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap_or_default().to_string(),
                e["normalized"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "/spec/containers/0".into(),
                "ghcr.io/example/api:1.4".into()
            ),
            ("/spec/containers/1".into(), "-".into()),
            (
                "/spec/initContainers/0".into(),
                "ghcr.io/example/migrate:1.0".into()
            ),
            (
                "/spec/ephemeralContainers/0".into(),
                "docker.io/library/busybox:latest".into()
            ),
        ]
    );
    assert_eq!(entries[0]["imagePullPolicy"], "Always");
    assert_eq!(entries[0]["list"], "containers");
    assert_eq!(entries[3]["list"], "ephemeralContainers");
    assert!(
        entries[1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("whitespace")
    );
}

#[test]
fn every_kind_has_its_pod_spec_path() {
    let cases = [
        ("v1", "Pod", "/spec"),
        ("v1", "ReplicationController", "/spec/template/spec"),
        ("apps/v1", "Deployment", "/spec/template/spec"),
        ("apps/v1", "StatefulSet", "/spec/template/spec"),
        ("apps/v1", "DaemonSet", "/spec/template/spec"),
        ("apps/v1", "ReplicaSet", "/spec/template/spec"),
        ("batch/v1", "Job", "/spec/template/spec"),
        (
            "batch/v1",
            "CronJob",
            "/spec/jobTemplate/spec/template/spec",
        ),
    ];
    for (api_version, kind, path) in cases {
        let object = json!({"apiVersion": api_version, "kind": kind});
        let workload = WorkloadKind::of_object(&object).expect(kind);
        assert_eq!(workload.pod_spec_path(), path, "{kind}");
        assert_eq!(workload.name(), kind);
    }
    assert_eq!(WorkloadKind::ALL.len(), cases.len());
    assert!(WorkloadKind::of_object(&json!({"apiVersion": "v1", "kind": "Deployment"})).is_none());
}

#[test]
fn every_kind_is_mutated_at_its_pod_spec() {
    let evaluator = evaluator_with(Settings::default());
    let pod_spec = json!({"containers": [{"name": "web", "image": "nginx:1.27"}]});
    let template = json!({"metadata": {"labels": {"app": "web"}}, "spec": pod_spec});
    let selector = json!({"matchLabels": {"app": "web"}});
    let objects = [
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"}, "spec": pod_spec}),
        json!({"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "w"}, "spec": {"selector": {"app": "web"}, "template": template}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"}, "spec": {"selector": selector, "template": template}}),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "w"}, "spec": {"selector": selector, "serviceName": "w", "template": template}}),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "w"}, "spec": {"selector": selector, "template": template}}),
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "w"}, "spec": {"selector": selector, "template": template}}),
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "w"}, "spec": {"template": template}}),
        json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "w"}, "spec": {"schedule": "@hourly", "jobTemplate": {"spec": {"template": template}}}}),
    ];
    for object in objects {
        let kind = WorkloadKind::of_object(&object).expect("kind");
        let decision = decide(&evaluator, annotate(object, "selectors"));
        let spec = decision
            .object
            .pointer(kind.pod_spec_path())
            .expect("pod spec");
        assert_eq!(
            spec["nodeSelector"],
            json!({NGINX_LABEL: "available"}),
            "{}",
            kind.name()
        );
    }
}

#[test]
fn configmap_manifest_loads_policies_and_settings() {
    let manifest = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: coral-policies, namespace: coral-system}
data:
  main.rego: |
    package coral.mutate
    warn contains "hello"
  main_test.rego: |
    package coral.mutate_test
    test_x if true
  settings.json: '{"scheduling": "preferred", "minAvailableNodes": 2}'
"#;
    let set = PolicySet::from_configmap_manifest(manifest, "cm.yaml").expect("loads");
    assert_eq!(set.files.len(), 1, "tests are not policies");
    assert_eq!(set.files[0].name, "main.rego");
    assert_eq!(set.settings.scheduling, Scheduling::Preferred);
    assert_eq!(set.settings.min_available_nodes, 2);
    CompiledPolicies::compile(&set).expect("compiles");
}

#[test]
fn configmap_errors_are_clear() {
    let cases = [
        ("data: {README.md: hi}", "key \"README.md\" is neither"),
        ("data: {settings.json: '{}'}", "holds no *.rego policies"),
        (
            "data: {a.rego: 'package coral.mutate', settings.json: '{\"sheduling\": \"x\"}'}",
            "unknown field `sheduling`",
        ),
        (
            "data: {a.rego: x, settings.json: '{\"preferredWeight\": 0}'}",
            "preferredWeight must be between 1 and 100",
        ),
        (
            "data: {a.rego: x, settings.json: '{\"defaultInject\": [\"mirror\"]}'}",
            "unknown injection \"mirror\"",
        ),
        ("binaryData: {a.rego: eA==}", "binaryData is not supported"),
        ("data: [1, 2]", "ConfigMap cm.yaml"),
    ];
    for (manifest, expected) in cases {
        let text = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: p}}\n{manifest}\n");
        let error = PolicySet::from_configmap_manifest(&text, "cm.yaml").expect_err(manifest);
        assert!(error.to_string().contains(expected), "{manifest}: {error}");
    }
}

#[test]
fn embedded_policies_are_the_files_in_policies_dir() {
    let dir = format!("{}/policies", env!("CARGO_MANIFEST_DIR"));
    let from_dir = PolicySet::from_dir(std::path::Path::new(&dir)).expect("policies dir");
    let embedded = PolicySet::embedded();
    let names = |set: &PolicySet| -> Vec<(String, String)> {
        set.files
            .iter()
            .map(|f| {
                let name = f.name.rsplit('/').next().unwrap_or_default().to_string();
                (name, f.source.clone())
            })
            .collect()
    };
    assert_eq!(names(&embedded), names(&from_dir));
    assert_eq!(embedded_file_names().len(), from_dir.files.len());
    assert_eq!(from_dir.settings, Settings::default());
}

#[test]
fn allowed_paths_match_segments_and_wildcards() {
    let allowed = AllowedPaths::default();
    let deployment = WorkloadKind::Deployment;
    assert!(allowed.allows(deployment, "/spec/template/spec/nodeSelector"));
    assert!(allowed.allows(deployment, "/spec/template/spec/nodeSelector/a~1b"));
    assert!(allowed.allows(
        deployment,
        "/spec/template/spec/containers/3/imagePullPolicy"
    ));
    assert!(!allowed.allows(deployment, "/spec/template/spec/containers/3/command"));
    assert!(!allowed.allows(deployment, "/spec/template/spec/nodeSelectorX"));
    assert!(!allowed.allows(deployment, "/spec/nodeSelector"));
    assert!(allowed.allows(WorkloadKind::Pod, "/spec/nodeSelector"));
    assert!(AllowedPaths::new(vec!["nodeSelector".into()]).is_err());
    assert!(AllowedPaths::new(vec!["{podSpec}/tolerations".into()]).is_ok());
}

#[test]
fn settings_default_and_validation() {
    let settings = Settings::from_json("{}").expect("empty settings are complete");
    assert_eq!(settings, Settings::default());
    assert!(settings.default_inject.is_empty());
    assert_eq!(settings.min_available_nodes, 1);
    assert_eq!(settings.pull_policy, PullPolicy::IfNotPresent);
    assert!(Settings::from_json(r#"{"pullPolicy": "Always"}"#).is_err());
    assert!(Settings::from_json(r#"{"scheduling": "soft"}"#).is_err());
}

#[test]
fn policies_the_vm_cannot_compile_run_on_the_interpreter() {
    let evaluator = custom_evaluator(
        r#"package coral.mutate
name := input.name
warn contains "overridden" if {
    n := name with input.name as "other"
    n == "other"
}"#,
    );
    assert!(!evaluator.uses_vm());
    let decision = decide(&evaluator, fixture("deployment-web.json"));
    assert_eq!(decision.warnings, vec!["overridden".to_string()]);
}

#[test]
fn an_undefined_complete_rule_does_not_hide_the_others() {
    // `patch` written as a complete rule that is undefined for this input: the warnings of
    // the other rule must still come through.
    let evaluator = custom_evaluator(
        r#"package coral.mutate
patch := [] if input.kind.kind == "Pod"
warn contains "still here""#,
    );
    let decision = decide(&evaluator, fixture("deployment-web.json"));
    assert_eq!(decision.warnings, vec!["still here".to_string()]);
    assert!(decision.patch.0.is_empty());
}

#[test]
fn containers_after_a_patch_reparse_only_changed_images() {
    let before = fixture("pod-api.json");
    let entries = containers(&before, WorkloadKind::Pod);
    let mut after = before.clone();
    after["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent".into();
    after["spec"]["containers"][1]["image"] = "registry.local:5000/nginx:1.27".into();
    let again = containers_after(&after, WorkloadKind::Pod, &entries);
    assert_eq!(again.len(), entries.len());
    assert_eq!(again[0]["normalized"], entries[0]["normalized"]);
    assert_eq!(again[0]["imagePullPolicy"], "IfNotPresent");
    assert_eq!(again[1]["normalized"], "registry.local:5000/nginx:1.27");
    assert_ne!(again[1]["label"], entries[1]["label"]);
    assert_eq!(
        again,
        containers(&after, WorkloadKind::Pod),
        "same as parsing afresh"
    );
}

#[test]
fn the_placement_key_ignores_corals_own_entries_and_pull_policies_only() {
    let kind = WorkloadKind::Deployment;
    let object = fixture("deployment-web.json");
    let key = |object: &Value| super::input::placement_key(object, kind, &containers(object, kind));
    let base = key(&object);
    let mut steered = object.clone();
    steered["spec"]["template"]["spec"]["nodeSelector"] =
        json!({"image.coral.dev/0000000000000000000000000000000000000000": "available"});
    steered["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Never");
    assert_eq!(
        key(&steered),
        base,
        "Coral's entries and pull policies change nothing"
    );
    for (field, value) in [
        ("nodeSelector", json!({"pool": "web"})),
        ("tolerations", json!([{"operator": "Exists"}])),
        ("nodeName", json!("a")),
        (
            "affinity",
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}),
        ),
    ] {
        let mut changed = object.clone();
        changed["spec"]["template"]["spec"][field] = value;
        assert_ne!(key(&changed), base, "{field}");
    }
    let mut image = object.clone();
    image["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.28");
    assert_ne!(key(&image), base, "another image");
}

/// [`STATE`] with nginx mirrored into Registry `local` (`reachable` as given).
fn mirrored_state(reachable: bool) -> String {
    let status = if reachable { "True" } else { "False" };
    format!(
        r#"
imageSets:
  - metadata: {{name: web, namespace: shop}}
    spec:
      images: ["nginx:1.27", "ghcr.io/example/api:1.4", "ghcr.io/example/migrate:1.0"]
      nodeSelector: {{matchLabels: {{pool: web}}}}
      mirror: {{registry: local}}
    status:
      images:
        - {{image: "nginx:1.27", normalized: "docker.io/library/nginx:1.27", label: "{NGINX_LABEL}",
           mirror: {{reference: "localhost:30500/docker.io/library/nginx:1.27", state: mirrored, digest: "sha256:{digest}"}}}}
registries:
  - metadata: {{name: local}}
    spec: {{endpoint: "localhost:30500"}}
    status:
      conditions: [{{type: Reachable, status: "{status}", reason: Probe, message: probe, lastTransitionTime: "2026-01-01T00:00:00Z"}}]
nodes:
  - {{name: a, labels: {{pool: web, kubernetes.io/os: linux}}, images: ["nginx:1.27"]}}
  - {{name: b, labels: {{pool: web, kubernetes.io/os: linux}}, images: ["nginx:1.27"]}}
namespaces:
  - {{name: shop, labels: {{coral.dev/inject: enabled}}}}
"#,
        digest = "a".repeat(64)
    )
}

fn mirrored_decision(reachable: bool, object: Value) -> Decision {
    let state = StateFile::parse(&mirrored_state(reachable), "test").expect("state");
    let index = state.to_index();
    let policies = CompiledPolicies::compile(&PolicySet::embedded()).expect("compile");
    let data = coral_data(&index, &Settings::default());
    let evaluator =
        Evaluator::new(&policies, data, EvaluatorOptions::default()).expect("evaluator");
    assert!(evaluator.uses_vm());
    let request = PolicyRequest::create(object, "shop").expect("request");
    evaluator
        .decide(&request, &BTreeMap::new(), &index.placement())
        .expect("decision")
}

/// A Pod of nginx:1.27 asking for `inject`.
fn nginx_pod(inject: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {"coral.dev/inject": inject}},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
    })
}

#[test]
fn the_mirror_injection_runs_a_ready_copy_and_converges_on_the_compiled_policies() {
    const MIRROR: &str = "localhost:30500/docker.io/library/nginx:1.27";
    let decision = mirrored_decision(true, nginx_pod("selectors,mirror"));
    let spec = &decision.object["spec"];
    assert_eq!(spec["containers"][0]["image"], MIRROR);
    assert_eq!(spec["nodeSelector"], json!({NGINX_LABEL: "available"}));

    // The rewritten Pod is the same image to the policies: nothing more changes.
    let again = mirrored_decision(true, decision.object.clone());
    assert!(again.patch.0.is_empty(), "{:?}", again.patch);
    assert!(
        again.warnings.iter().all(|w| !w.contains("not managed")),
        "{:?}",
        again.warnings
    );

    // A workload's template keeps its images.
    let deployment = annotate(fixture("deployment-web.json"), "selectors,mirror");
    let workload = mirrored_decision(true, deployment);
    assert_eq!(
        workload.object["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.27"
    );

    // The Registry stops answering: new Pods keep their source, rewritten ones get it back.
    let down = mirrored_decision(false, nginx_pod("selectors,mirror"));
    assert_eq!(down.object["spec"]["containers"][0]["image"], "nginx:1.27");
    let back = mirrored_decision(false, decision.object);
    assert_eq!(
        back.object["spec"]["containers"][0]["image"],
        "docker.io/library/nginx:1.27"
    );
    assert!(
        back.warnings
            .iter()
            .any(|w| w.contains("is not ready; it pulls from the source")),
        "{:?}",
        back.warnings
    );
}

#[test]
fn the_data_says_where_each_image_is_mirrored_and_whether_its_copy_is_ready() {
    for reachable in [true, false] {
        let state = StateFile::parse(&mirrored_state(reachable), "test").expect("state");
        let data = coral_data(&state.to_index(), &Settings::default());
        let coral = &data["coral"];
        assert_eq!(
            coral["images"]["docker.io/library/nginx:1.27"]["mirror"],
            json!({
                "reference": "localhost:30500/docker.io/library/nginx:1.27",
                "digest": format!("sha256:{}", "a".repeat(64)),
                "registry": "local",
                "ready": reachable,
            })
        );
        assert!(
            coral["images"]["ghcr.io/example/api:1.4"]
                .get("mirror")
                .is_none()
        );
        assert_eq!(
            coral["registries"],
            json!({"local": {"endpoint": "localhost:30500", "reachable": reachable}})
        );
        assert_eq!(
            coral["mirrors"],
            json!({"localhost:30500/docker.io/library/nginx:1.27": "docker.io/library/nginx:1.27"})
        );
    }
}

/// The mirrored state with what each node says it holds nginx:1.27 under.
fn pinned_decision(digest_a: &str, digest_b: &str, object: Value) -> Decision {
    let mut state = StateFile::parse(&mirrored_state(true), "test").expect("state");
    for (node, digest) in state.nodes.iter_mut().zip([digest_a, digest_b]) {
        node.digests = BTreeMap::from([("nginx:1.27".to_string(), digest.to_string())]);
    }
    let index = state.to_index();
    let policies = CompiledPolicies::compile(&PolicySet::embedded()).expect("compile");
    let evaluator = Evaluator::new(
        &policies,
        coral_data(&index, &Settings::default()),
        EvaluatorOptions::default(),
    )
    .expect("evaluator");
    assert!(evaluator.uses_vm());
    let request = PolicyRequest::create(object, "shop").expect("request");
    evaluator
        .decide(&request, &BTreeMap::new(), &index.placement())
        .expect("decision")
}

#[test]
fn the_pin_injection_pins_agreed_digests_keeps_placement_and_converges_on_the_compiled_policies() {
    let a = format!("sha256:{}", "1".repeat(64));
    let b = format!("sha256:{}", "2".repeat(64));
    let mirror = format!("sha256:{}", "a".repeat(64));
    // A workload: its template runs nginx by the digest both nodes hold, steered to them.
    let deployment = annotate(fixture("deployment-web.json"), "selectors,pin");
    let pinned = pinned_decision(&a, &a, deployment);
    let spec = &pinned.object["spec"]["template"]["spec"];
    assert_eq!(
        spec["containers"][0]["image"],
        format!("nginx:1.27@{a}"),
        "{:?}",
        pinned.warnings
    );
    assert_eq!(spec["nodeSelector"][NGINX_LABEL], "available");
    let again = pinned_decision(&a, &a, pinned.object.clone());
    assert!(again.patch.0.is_empty(), "{:?}", again.patch);
    assert!(
        again.warnings.iter().all(|w| !w.contains("not managed")),
        "the pinned reference is the managed image: {:?}",
        again.warnings
    );

    // Drift: no pin, and the warning names both digests.
    let deployment = annotate(fixture("deployment-web.json"), "selectors,pin");
    let drift = pinned_decision(&a, &b, deployment);
    let spec = &drift.object["spec"]["template"]["spec"];
    assert_eq!(spec["containers"][0]["image"], "nginx:1.27");
    assert!(
        drift
            .warnings
            .iter()
            .any(|w| w.contains("held under different digests")
                && w.contains(&a)
                && w.contains(&b)),
        "{:?}",
        drift.warnings
    );

    // A Pod run from the mirror: the mirror reference by the digest the mirror serves.
    let pod = pinned_decision(&a, &a, nginx_pod("mirror,pin"));
    assert_eq!(
        pod.object["spec"]["containers"][0]["image"],
        format!("localhost:30500/docker.io/library/nginx:1.27@{mirror}")
    );
    let again = pinned_decision(&a, &a, pod.object.clone());
    assert!(again.patch.0.is_empty(), "{:?}", again.patch);
}
