//! Placement safety judged by the real Kubernetes scheduler: a control plane built from the
//! Kubernetes modules (`scripts/control-plane.sh`), the real `coral webhook` under its own
//! ServiceAccount with the RBAC of `deploy/`, registered with a MutatingWebhookConfiguration
//! made from `deploy/`'s (a `url` on loopback, since nothing routes Service IPs here). For every
//! stranding case of the default policies, a workload is created with kubectl; the controller
//! manager makes its Pods and the scheduler must bind every one of them, to a node that holds
//! what it was steered to.
//!
//! The real `coral controller`, under its own ServiceAccount too, writes the ImageSet's status;
//! when the ImageSet is deleted while workloads still require its labels, its images retire
//! (finalizer held, `Retiring` condition) until forced, and what is then stranded is reported.
//!
//! Needs the control plane: `scripts/test.sh` builds it and runs this with `--ignored`; without
//! it the test is reported as ignored, never as passed.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

mod support;

#[path = "support/runtime.rs"]
#[allow(dead_code)]
mod runtime;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use support::control_plane::ControlPlane;
use support::{Webhook, get_probe};

fn label(image: &str) -> String {
    coral::image::label_key(&coral::image::ImageReference::parse(image).unwrap())
}

/// The objects of a YAML file of the repository.
fn manifests(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|value| !value.is_null())
        .collect()
}

/// `deploy/`'s webhook configurations, pointed at the webhook on loopback (as `localhost`,
/// the name the controller's certificate gives it here), with no caBundle: the controller
/// fills it in.
fn webhook_configurations(port: u16) -> Vec<Value> {
    let mut configurations = manifests("deploy/base/webhook-configurations.yaml");
    for configuration in &mut configurations {
        for webhook in configuration["webhooks"].as_array_mut().unwrap() {
            let path = webhook["clientConfig"]["service"]["path"]
                .as_str()
                .unwrap()
                .to_string();
            webhook["clientConfig"] = json!({"url": format!("https://localhost:{port}{path}")});
            // The API server and the webhook share two busy cores in the tests.
            webhook["timeoutSeconds"] = json!(10);
        }
    }
    configurations
}

/// The object `kubectl get … -o json` answers, once it exists.
fn wait_for(plane: &ControlPlane, what: &str, args: &[&str]) -> Value {
    let mut found = Value::Null;
    wait_until(what, Duration::from_secs(30), || {
        let output = plane.kubectl(args);
        found = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        output.status.success()
    });
    found
}

/// Where the Pods of `app` in `shop` were bound, once all of them are; panics with the
/// scheduler's message when one cannot be scheduled.
fn bound_nodes(plane: &ControlPlane, app: &str, replicas: usize) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods: Value = serde_json::from_str(&plane.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            "shop",
            "-l",
            &format!("app={app}"),
            "-o",
            "json",
        ]))
        .unwrap();
        let items = pods["items"].as_array().unwrap();
        let nodes: Vec<&str> = items
            .iter()
            .filter_map(|pod| pod["spec"]["nodeName"].as_str())
            .collect();
        if items.len() >= replicas && nodes.len() == items.len() {
            return nodes.into_iter().map(str::to_string).collect();
        }
        if Instant::now() > deadline {
            let events = plane.kubectl_ok(&[
                "get",
                "events",
                "-n",
                "shop",
                "--field-selector",
                "reason=FailedScheduling",
                "-o",
                "custom-columns=OBJECT:.involvedObject.name,MESSAGE:.message",
            ]);
            panic!("{app}: pods not all bound: {pods}\n{events}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A Deployment of `images` in `shop`, asking for both injections, with `pod_spec` merged in.
fn deployment(app: &str, images: &[&str], pod_spec: Value) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
        .collect();
    let mut spec = json!({"containers": containers});
    for (key, value) in pod_spec.as_object().unwrap() {
        spec[key] = value.clone();
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "namespace": "shop", "annotations": {"coral.dev/inject": "selectors,pull-policy"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": app}},
            "template": {"metadata": {"labels": {"app": app}}, "spec": spec},
        },
    })
}

/// The stored template's nodeSelector.
fn stored_selector(plane: &ControlPlane, app: &str) -> Value {
    let object: Value = serde_json::from_str(&plane.kubectl_ok(&[
        "get",
        "deployment",
        app,
        "-n",
        "shop",
        "-o",
        "json",
    ]))
    .unwrap();
    object["spec"]["template"]["spec"]
        .get("nodeSelector")
        .cloned()
        .unwrap_or(json!({}))
}

/// The binaries of `scripts/control-plane.sh`.
fn control_plane_binaries() -> std::path::PathBuf {
    ControlPlane::binaries().unwrap_or_else(|| {
        panic!(
            "{} is not set: run scripts/control-plane.sh",
            support::control_plane::BIN_ENV
        )
    })
}

/// A control plane with Coral's CRDs (Established), namespace and RBAC as `deploy/` has them,
/// the manifests of `extra`, and the namespace `shop`.
fn coral_control_plane(extra: &[&str]) -> ControlPlane {
    let plane = ControlPlane::start(&control_plane_binaries());
    let mut args = vec![
        "apply",
        "-f",
        "crds/",
        "-f",
        "deploy/base/namespace.yaml",
        "-f",
        "deploy/base/rbac.yaml",
    ];
    for manifest in extra {
        args.extend(["-f", manifest]);
    }
    plane.kubectl_ok(&args);
    wait_for_crds(&plane);
    plane.kubectl_ok(&["create", "namespace", "shop"]);
    plane
}

/// The same, the namespace `shop` opted in to Coral's injections.
fn injecting_control_plane() -> ControlPlane {
    let plane = coral_control_plane(&[]);
    plane.kubectl_ok(&["label", "namespace", "shop", "coral.dev/inject=enabled"]);
    plane
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_real_scheduler_binds_every_pod_coral_mutated() {
    let plane = injecting_control_plane();
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {"images": ["nginx:1.27", "nginx:1.28", "redis:7.4", "busybox:1.36", "alpine:3.20"]},
    });
    let output = plane.kubectl_stdin(&["create"], &image_set);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The nodes of tests/data/placement/state.yaml, labelled as agents label them.
    let held = |images: &[&str], extra: Value| {
        let mut labels = extra;
        for image in images {
            labels[label(image)] = json!("available");
        }
        labels
    };
    plane.node(
        "web-a",
        held(&["nginx:1.27", "nginx:1.28"], json!({"pool": "web"})),
        json!([]),
        false,
    );
    plane.node(
        "web-b",
        held(&["redis:7.4"], json!({"pool": "web"})),
        json!([]),
        false,
    );
    plane.node("db-a", held(&[], json!({"pool": "db"})), json!([]), false);
    plane.node(
        "gpu-a",
        held(&["busybox:1.36"], json!({"pool": "gpu"})),
        json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
        false,
    );
    plane.node(
        "old-a",
        held(&["alpine:3.20"], json!({"pool": "old"})),
        json!([]),
        true,
    );

    // The webhook, under its own ServiceAccount, and registered as deploy/ registers it.
    let kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-webhook");
    let webhook = Webhook::start_with_kubeconfig(
        &kubeconfig,
        &["--debounce-ms", "50", "--pod-name", "coral-webhook-0"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    loop {
        let (status, body) = runtime.block_on(get_probe(&webhook, "/readyz"));
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook never became ready: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The controller, under its own ServiceAccount: the webhook's certificate and caBundle,
    // status, stranded workloads, retiring.
    let controller_probes = free_address();
    let _controller = support::process::Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_coral"))
            .args([
                "controller",
                "--pod-name",
                "controller-0",
                "--debounce",
                "100ms",
                "--resync",
                "2s",
                "--cleanup-timeout",
                "1s",
                "--manage-webhook-certs",
                // The certificate names the Service; here the webhook is reached as localhost.
                "--webhook-service",
                "localhost",
            ])
            .arg("--probe-listen")
            .arg(controller_probes.to_string())
            .env(
                "KUBECONFIG",
                plane.service_account_kubeconfig("coral-system", "coral-controller"),
            )
            .env("KUBERNETES_SERVICE_HOST", "")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(
        "the controller is ready (every watch listed: its RBAC is enough)",
        Duration::from_secs(30),
        || http_get(controller_probes, "/readyz").starts_with("HTTP/1.1 200"),
    );

    // The webhook serves the certificate the controller issued (mounted from its Secret in a
    // cluster; copied to the files the webhook watches here), and the configurations, applied
    // without a caBundle, get it from the controller.
    let secret = wait_for(
        &plane,
        "the webhook certificate Secret",
        &[
            "get",
            "secret",
            "coral-webhook-tls",
            "-n",
            "coral-system",
            "-o",
            "json",
        ],
    );
    let decode = |key: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(secret["data"][key].as_str().unwrap())
            .unwrap()
    };
    std::fs::write(webhook.path("tls.key"), decode("tls.key")).unwrap();
    std::fs::write(webhook.path("tls.crt"), decode("tls.crt")).unwrap();
    for configuration in webhook_configurations(webhook.https.port()) {
        let output = plane.kubectl_stdin(&["apply"], &configuration);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    wait_until(
        "the controller to fill in the caBundle",
        Duration::from_secs(30),
        || {
            plane
                .kubectl_ok(&[
                    "get",
                    "mutatingwebhookconfiguration",
                    "coral",
                    "-o",
                    "jsonpath={.webhooks[0].clientConfig.caBundle}",
                ])
                .trim()
                .len()
                > 100
        },
    );
    // The API server's webhook client picks the configuration up within a moment: wait until
    // a dry-run create comes back mutated.
    let probe = deployment("probe", &["nginx:1.27"], json!({}));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = plane.kubectl_stdin(&["create", "--dry-run=server", "-o", "json"], &probe);
        let object: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if object["spec"]["template"]["spec"]["nodeSelector"][label("nginx:1.27")] == "available" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API server never called the webhook: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Invalid ImageSets: the CRD schema refuses what it can say, Coral's validating webhook
    // the rest.
    let invalid = |name: &str, images: Value| {
        json!({"apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
               "metadata": {"name": name, "namespace": "shop"}, "spec": {"images": images}})
    };
    let output = plane.kubectl_stdin(&["create"], &invalid("empty", json!([])));
    let refusal = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && refusal.contains("spec.images"),
        "{refusal}"
    );
    // The webhook is registered with failurePolicy Ignore (as deploy/ has it): a call that
    // misses its 2 s timeout on a loaded machine lets the object through. Such an object is
    // deleted and the create tried again, at most three times; the refusal must come.
    let mut output = None;
    for attempt in 1..=3 {
        let created = plane.kubectl_stdin(
            &["create"],
            &invalid("twice", json!(["nginx", "docker.io/library/nginx:latest"])),
        );
        if !created.status.success() {
            output = Some(created);
            break;
        }
        eprintln!("attempt {attempt}: the API server let the ImageSet through (webhook ignored)");
        plane.kubectl_ok(&["delete", "imageset", "twice", "-n", "shop"]);
    }
    let output = output.expect("the validating webhook never refused the duplicate");
    let refusal = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && refusal.contains("denied the request")
            && refusal.contains("is the same image as spec.images[0]"),
        "{refusal}"
    );

    // Reinvocation: a second webhook, called after Coral's (configurations go by name), adds
    // an init container; the API server calls Coral again (reinvocationPolicy IfNeeded), and
    // Coral steers to that image too.
    let second = SecondWebhook::start();
    let add_init = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "zz-add-init"},
        "webhooks": [{
            "name": "add-init.test.coral.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"url": format!("https://localhost:{}/mutate", second.port),
                             "caBundle": base64::engine::general_purpose::STANDARD.encode(second.authority.pem())},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
            "objectSelector": {"matchLabels": {"test.coral.dev/add-init": "nginx-1.28"}},
            "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["deployments"]}],
            "failurePolicy": "Fail", "timeoutSeconds": 10, "reinvocationPolicy": "Never",
        }],
    });
    let output = plane.kubectl_stdin(&["apply"], &add_init);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let required_pool_db = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["db"]}]},
    ]}}});
    let untainted: BTreeSet<String> = ["web-a", "web-b", "db-a"].map(String::from).into();
    let cases: Vec<(&str, Vec<&str>, Value, BTreeSet<String>)> = vec![
        // 1. Two images on different nodes: steered to one, still schedulable.
        (
            "apart",
            vec!["nginx:1.27", "redis:7.4"],
            json!({}),
            ["web-a", "web-b"].map(String::from).into(),
        ),
        // 2. The pod's own nodeSelector and required affinity keep it off the image's nodes.
        (
            "db-selector",
            vec!["nginx:1.27"],
            json!({"nodeSelector": {"pool": "db"}}),
            ["db-a".to_string()].into(),
        ),
        (
            "db-affinity",
            vec!["nginx:1.27"],
            json!({"affinity": required_pool_db}),
            ["db-a".to_string()].into(),
        ),
        // ... an image held only by a node whose taint it does not tolerate, or a cordoned one.
        (
            "tainted-only",
            vec!["busybox:1.36"],
            json!({}),
            untainted.clone(),
        ),
        (
            "cordoned-only",
            vec!["alpine:3.20"],
            json!({}),
            untainted.clone(),
        ),
        // 3. An updated image whose old key stays in the template.
        (
            "updated",
            vec!["nginx:1.28"],
            json!({"nodeSelector": {label("nginx:1.27"): "available", "pool": "web"}}),
            ["web-a".to_string()].into(),
        ),
        // Positive controls: a tolerated taint keeps the label; a node holding all gets all.
        (
            "tolerant",
            vec!["busybox:1.36"],
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}),
            ["gpu-a".to_string()].into(),
        ),
        (
            "together",
            vec!["nginx:1.27", "nginx:1.28"],
            json!({}),
            ["web-a".to_string()].into(),
        ),
    ];
    let mut reinvoked = deployment("reinvoked", &["nginx:1.27"], json!({}));
    reinvoked["metadata"]["labels"] = json!({"test.coral.dev/add-init": "nginx-1.28"});
    let output = plane.kubectl_stdin(&["create"], &reinvoked);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (app, images, pod_spec, _) in &cases {
        let output = plane.kubectl_stdin(&["create"], &deployment(app, images, pod_spec.clone()));
        assert!(
            output.status.success(),
            "{app}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for (app, _, _, expected) in &cases {
        let nodes = bound_nodes(&plane, app, 2);
        assert!(
            nodes.is_subset(expected),
            "{app}: bound to {nodes:?}, expected within {expected:?}"
        );
    }
    assert_eq!(
        bound_nodes(&plane, "reinvoked", 2),
        ["web-a".to_string()].into()
    );
    assert_eq!(
        stored_selector(&plane, "reinvoked"),
        json!({label("nginx:1.27"): "available", label("nginx:1.28"): "available"}),
        "reinvoked after the second webhook added nginx:1.28"
    );
    drop(second);
    // What the webhook did, in the stored templates.
    assert_eq!(
        stored_selector(&plane, "tolerant"),
        json!({label("busybox:1.36"): "available"})
    );
    assert_eq!(
        stored_selector(&plane, "together"),
        json!({label("nginx:1.27"): "available", label("nginx:1.28"): "available"})
    );
    assert_eq!(
        stored_selector(&plane, "updated"),
        json!({"pool": "web", label("nginx:1.28"): "available"})
    );
    assert_eq!(
        stored_selector(&plane, "db-selector"),
        json!({"pool": "db"})
    );
    let apart = stored_selector(&plane, "apart");
    assert_eq!(
        apart.as_object().unwrap().len(),
        1,
        "steered to one of the two images: {apart}"
    );

    // A Pod, not a template, is judged the same way; the scheduler binds it too.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bare", "namespace": "shop", "labels": {"app": "bare"}, "annotations": {"coral.dev/inject": "selectors,pull-policy"}},
        "spec": {"containers": [{"name": "a", "image": "nginx:1.27"}, {"name": "b", "image": "redis:7.4"}]},
    });
    let output = plane.kubectl_stdin(&["create"], &pod);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let nodes = bound_nodes(&plane, "bare", 1);
    assert!(
        nodes.is_subset(&["web-a", "web-b"].map(String::from).into()),
        "{nodes:?}"
    );

    // `coral audit` of the cluster, through the admin kubeconfig: nothing stranded.
    let (code, text) = audit(&plane, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("no stranded workloads"), "{text}");

    // The controller has the ImageSet's status written; nothing is stranded. The printer
    // columns answer "is it there yet?".
    wait_until("the ImageSet's status", Duration::from_secs(30), || {
        image_set_status(&plane)["imageCount"] == 5
    });
    let table = plane.kubectl_ok(&["get", "imagesets", "-n", "shop"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "IMAGES", "NODES", "COMPLETE", "READY", "AGE"],
        "{table}"
    );
    assert!(table.contains("shop   5"), "{table}");
    assert!(
        http_get(controller_probes, "/metrics")
            .contains("coral_stranded_workloads{kind=\"Deployment\"} 0")
    );

    // 4. The ImageSet deleted while workloads require its labels: its images are retiring,
    // the finalizer holds it, and the condition names the workloads.
    plane.kubectl_ok(&["delete", "imageset", "shop", "-n", "shop", "--wait=false"]);
    wait_until("the Retiring condition", Duration::from_secs(30), || {
        image_set_status(&plane)["conditions"]
            .as_array()
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "Retiring"
                        && c["message"]
                            .as_str()
                            .unwrap_or("")
                            .contains("Deployment shop/together")
                })
            })
    });
    // An update of a template drops the keys of the images no longer managed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        plane.kubectl_ok(&[
            "annotate",
            "deployment",
            "together",
            "-n",
            "shop",
            "--overwrite",
            &format!("touched={}", deadline.elapsed().as_nanos()),
        ]);
        if stored_selector(&plane, "together") == json!({}) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the keys of unmanaged images stayed: {}",
            stored_selector(&plane, "together")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Forced: the retiring images go, the controller removes the labels (no agent runs here;
    // --cleanup-timeout 1s) and releases the finalizer; what still requires them is stranded.
    plane.kubectl_ok(&[
        "annotate",
        "imageset",
        "shop",
        "-n",
        "shop",
        "coral.dev/force-remove=true",
    ]);
    wait_until("the ImageSet to go", Duration::from_secs(30), || {
        !plane
            .kubectl(&["get", "imageset", "shop", "-n", "shop"])
            .status
            .success()
    });
    let web_a: Value =
        serde_json::from_str(&plane.kubectl_ok(&["get", "node", "web-a", "-o", "json"])).unwrap();
    assert!(
        web_a["metadata"]["labels"]
            .get(label("nginx:1.27"))
            .is_none(),
        "{}",
        web_a["metadata"]["labels"]
    );
    wait_until(
        "a Stranded Event on a workload that still requires a removed label",
        Duration::from_secs(30),
        || {
            !plane
                .kubectl_ok(&[
                    "get",
                    "events",
                    "-n",
                    "shop",
                    "--field-selector",
                    "reason=Stranded,involvedObject.name=tolerant",
                    "-o",
                    "name",
                ])
                .trim()
                .is_empty()
        },
    );
    assert!(
        !http_get(controller_probes, "/metrics")
            .contains("coral_stranded_workloads{kind=\"Deployment\"} 0")
    );
    // `coral audit` finds the same, with the reason: the image no ImageSet manages any more.
    let (code, text) = audit(&plane, &["-o", "json"]);
    assert_eq!(code, Some(1), "{text}");
    let found: Value = serde_json::from_str(&text).unwrap();
    let tolerant = found
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "tolerant")
        .unwrap_or_else(|| panic!("{found}"));
    assert_eq!(tolerant["kind"], "Deployment");
    assert_eq!(tolerant["images"][0]["image"], Value::Null, "{tolerant}");
    assert_eq!(tolerant["nodes"], 0);

    // failurePolicy Ignore: with the webhook gone, workloads are admitted unchanged.
    drop(webhook);
    let output = plane.kubectl_stdin(
        &["create"],
        &deployment("unanswered", &["nginx:1.28"], json!({})),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stored_selector(&plane, "unanswered"), json!({}));
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn deploy_and_its_overlays_apply_to_a_real_api_server() {
    let plane = ControlPlane::start(&control_plane_binaries());
    // A server-side dry run cannot create the namespace its other objects go in.
    plane.kubectl_ok(&[
        "apply",
        "--server-side",
        "--field-manager=coral-test",
        "-f",
        "deploy/base/namespace.yaml",
    ]);
    // deploy/ first (its CRDs), then every overlay there is.
    let overlays = support::overlays();
    assert!(overlays.len() >= 5, "{overlays:?}");
    for dir in std::iter::once("deploy".to_string()).chain(overlays) {
        let dir = dir.as_str();
        let rendered = std::process::Command::new("kubectl")
            .args(["kustomize", dir])
            .output()
            .unwrap();
        assert!(
            rendered.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        // cert-manager's and the Prometheus Operator's own kinds need their CRDs, which are
        // not Coral's to install.
        let objects: Vec<Value> = serde_yaml::Deserializer::from_slice(&rendered.stdout)
            .map(|document| Value::deserialize(document).unwrap())
            .filter(|o| {
                let api_version = o["apiVersion"].as_str().unwrap_or("");
                !api_version.starts_with("cert-manager.io/")
                    && !api_version.starts_with("monitoring.coreos.com/")
            })
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        for args in [
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=coral-test",
            ][..],
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=coral-test",
            ][..],
        ] {
            let output = plane.kubectl_stdin(args, &list);
            assert!(
                output.status.success(),
                "kubectl {} of {dir}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        if dir == "deploy" {
            wait_for_crds(&plane);
        }
    }
    // The API server type-checked the agent's ValidatingAdmissionPolicy: no warnings.
    let mut status = Value::Null;
    wait_until("the policy's type check", Duration::from_secs(30), || {
        let policy: Value = serde_json::from_str(&plane.kubectl_ok(&[
            "get",
            "validatingadmissionpolicy",
            "coral-agent-own-node",
            "-o",
            "json",
        ]))
        .unwrap();
        status = policy["status"].clone();
        status.get("typeChecking").is_some()
    });
    assert!(
        status["typeChecking"]["expressionWarnings"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{status}"
    );
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN) and the Helm built by scripts/helm.sh (CORAL_HELM_BIN); scripts/test.sh runs it"]
fn the_helm_chart_with_every_value_changed_applies_to_a_real_api_server() {
    // tests/helm.rs checks that the chart's defaults equal deploy/ (which the test above
    // applies); this applies what every other value renders.
    let plane = ControlPlane::start(&control_plane_binaries());
    let objects: Vec<Value> = support::helm::render(&["--values", "tests/data/helm-values.yaml"])
        .into_iter()
        .filter(|o| {
            let api_version = o["apiVersion"].as_str().unwrap_or("");
            !api_version.starts_with("cert-manager.io/")
                && !api_version.starts_with("monitoring.coreos.com/")
        })
        .collect();
    // The namespace and the CRDs first: a dry run cannot create what its other objects need.
    let (first, rest): (Vec<Value>, Vec<Value>) = objects
        .into_iter()
        .partition(|o| o["kind"] == "Namespace" || o["kind"] == "CustomResourceDefinition");
    let apply = |items: Vec<Value>, dry_run: bool| {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let mut args = vec!["apply", "--server-side", "--field-manager=coral-test"];
        if dry_run {
            args.push("--dry-run=server");
        }
        let output = plane.kubectl_stdin(&args, &list);
        assert!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    apply(first, false);
    wait_for_crds(&plane);
    apply(rest.clone(), true);
    apply(rest, false);
    let namespace: Value =
        serde_json::from_str(&plane.kubectl_ok(&["get", "namespace", "images", "-o", "json"]))
            .unwrap();
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let stored: Value = serde_json::from_str(&plane.kubectl_ok(&[
        "get",
        "deployment",
        "coral-webhook",
        "-n",
        "images",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(stored["spec"]["replicas"], 1);
}

/// Waits until Coral's CRDs are Established.
fn wait_for_crds(plane: &ControlPlane) {
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/imagesets.coral.dev",
        "crd/nodeimages.coral.dev",
        "crd/registries.coral.dev",
        "--timeout=30s",
    ]);
}

fn image_set_status(plane: &ControlPlane) -> Value {
    let output = plane.kubectl(&["get", "imageset", "shop", "-n", "shop", "-o", "json"]);
    serde_json::from_slice::<Value>(&output.stdout)
        .map(|set| set["status"].clone())
        .unwrap_or(Value::Null)
}

fn free_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A plain HTTP GET; the whole answer, status line first (empty when nothing listens).
fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return String::new();
    };
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// kubectl with another kubeconfig; whether it succeeded, and its error output.
fn kubectl_as(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_agent_labels_its_own_node_with_its_own_token_and_nothing_else() {
    let plane = coral_control_plane(&["deploy/base/agent-policy.yaml"]);
    let containerd = runtime::Containerd::start();
    let registry = runtime::Registry::start(None);
    let app = registry.push("shop/app", "1.0", "app");
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"images": [app], "nodeSelector": {"matchLabels": {"pool": "web"}}},
    });
    assert!(
        plane
            .kubectl_stdin(&["create"], &image_set)
            .status
            .success()
    );
    plane.node("node-a", json!({"pool": "web"}), json!([]), false);
    plane.node("node-b", json!({"pool": "web"}), json!([]), false);

    // The agent's token as the kubelet mounts it: bound to its Pod on node-a, so it carries
    // the node's name.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "coral-agent-node-a", "namespace": "coral-system"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "coral-agent",
                 "containers": [{"name": "agent", "image": "coral:test"}]},
    });
    assert!(plane.kubectl_stdin(&["create"], &pod).status.success());
    let token = plane.kubectl_ok(&[
        "create",
        "token",
        "coral-agent",
        "-n",
        "coral-system",
        "--duration=1h",
        "--bound-object-kind=Pod",
        "--bound-object-name=coral-agent-node-a",
    ]);
    let kubeconfig =
        plane.service_account_kubeconfig_with_token(token.trim(), "coral-agent-node-a");
    let _agent = support::process::Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_coral"))
            .args([
                "agent",
                "--node-name",
                "node-a",
                "--probe-listen",
                "127.0.0.1:0",
                "--debounce",
                "50ms",
            ])
            .args(["--cri-socket", &containerd.address()])
            .env("KUBECONFIG", &kubeconfig)
            .env("KUBERNETES_SERVICE_HOST", "")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );

    // It pulls the image through containerd, labels its Node and records its NodeImage.
    let key = label(&app);
    wait_until(
        "node-a labelled and its NodeImage written",
        Duration::from_secs(60),
        || {
            let node: Value =
                serde_json::from_str(&plane.kubectl_ok(&["get", "node", "node-a", "-o", "json"]))
                    .unwrap();
            let output = plane.kubectl(&["get", "nodeimage", "node-a", "-o", "json"]);
            let node_image: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            node["metadata"]["labels"][&key] == "available"
                && node_image["status"]["available"] == 1
        },
    );

    // The controller turns what the agent recorded into the ImageSet's status: both nodes
    // are targeted, the one with an agent holds the image.
    let _controller = start_controller(&plane, "controller-0");
    wait_until(
        "the ImageSet's status as the agent reports",
        Duration::from_secs(30),
        || {
            let output = plane.kubectl(&["get", "imageset", "web", "-n", "shop", "-o", "json"]);
            let set: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            let image = &set["status"]["images"][0];
            let ready = set["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
                .unwrap_or(Value::Null);
            image["nodesTargeted"] == 2
                && image["nodesAvailable"] == 1
                && ready["status"] == "False"
                && ready["reason"] == "NotAllAvailable"
        },
    );

    // The agent's own token, through the API server's admission: its own Node's Coral labels
    // only.
    let coral_label = format!("{}=available", label("busybox:1.36"));
    let (allowed, error) = kubectl_as(&kubeconfig, &["label", "node", "node-a", &coral_label]);
    assert!(allowed, "its own node's Coral label: {error}");
    for (what, args) in [
        (
            "another node",
            vec!["label", "node", "node-b", coral_label.as_str()],
        ),
        (
            "a label that is not Coral's",
            vec!["label", "node", "node-a", "pool=batch", "--overwrite"],
        ),
        (
            "the node's spec",
            vec![
                "patch",
                "node",
                "node-a",
                "-p",
                r#"{"spec":{"unschedulable":true}}"#,
            ],
        ),
    ] {
        let (allowed, error) = kubectl_as(&kubeconfig, &args);
        assert!(
            !allowed && error.contains("coral-agent-own-node"),
            "{what}: allowed={allowed} {error}"
        );
    }
    let other = std::env::temp_dir().join(format!("coral-nodeimage-{}.json", std::process::id()));
    std::fs::write(
        &other,
        json!({"apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
               "metadata": {"name": "node-b"}, "spec": {"nodeName": "node-b"}})
        .to_string(),
    )
    .unwrap();
    let (allowed, error) = kubectl_as(&kubeconfig, &["create", "-f", other.to_str().unwrap()]);
    let _ = std::fs::remove_file(&other);
    assert!(
        !allowed && error.contains("coral-agent-own-node"),
        "another node's NodeImage: {error}"
    );
    let node_b: Value =
        serde_json::from_str(&plane.kubectl_ok(&["get", "node", "node-b", "-o", "json"])).unwrap();
    assert!(
        node_b["metadata"]["labels"]
            .get(label("busybox:1.36"))
            .is_none()
    );
}

/// Which controller replica holds the Lease (empty: none, or the API server does not answer).
fn lease_holder(plane: &ControlPlane) -> String {
    let output = plane.kubectl(&[
        "get",
        "lease",
        "coral-controller",
        "-n",
        "coral-system",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A `coral controller` under the coral-controller ServiceAccount, killed when dropped.
fn start_controller(plane: &ControlPlane, name: &str) -> support::process::Kill {
    start_controller_with(plane, name, &["--probe-listen", "127.0.0.1:0"])
}

/// The same, with more flags.
fn start_controller_with(
    plane: &ControlPlane,
    name: &str,
    extra: &[&str],
) -> support::process::Kill {
    support::process::Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_coral"))
            .args(["controller", "--pod-name", name, "--lease-duration", "3s"])
            .args(["--debounce", "100ms", "--resync", "2s"])
            .args(extra)
            .env(
                "KUBECONFIG",
                plane.service_account_kubeconfig("coral-system", "coral-controller"),
            )
            .env("KUBERNETES_SERVICE_HOST", "")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_standby_controller_takes_over_when_the_leader_dies() {
    let plane = coral_control_plane(&[]);
    let image_set_with_secret = |name: &str, secret: &str| {
        plane.kubectl_ok(&[
            "create",
            "secret",
            "docker-registry",
            secret,
            "-n",
            "shop",
            "--docker-server=registry.example.com",
            "--docker-username=u",
            "--docker-password=p",
        ]);
        let set = json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"images": ["registry.example.com/app:1"], "imagePullSecrets": [{"name": secret}]},
        });
        assert!(plane.kubectl_stdin(&["create"], &set).status.success());
    };
    let holder = || lease_holder(&plane);
    let mut first = Some(start_controller(&plane, "controller-0"));
    wait_until("controller-0 to lead", Duration::from_secs(30), || {
        holder() == "controller-0"
    });
    let _second = start_controller(&plane, "controller-1");

    // The leader copies the pull secret an ImageSet references into Coral's namespace.
    image_set_with_secret("web", "registry-web");
    let copy = coral::controller::secrets::copy_name("shop", "registry-web");
    let secret = wait_for(
        &plane,
        "the pull-secret copy",
        &["get", "secret", &copy, "-n", "coral-system", "-o", "json"],
    );
    assert_eq!(secret["type"], "kubernetes.io/dockerconfigjson");
    assert_eq!(
        secret["metadata"]["annotations"]["coral.dev/source"],
        "shop/registry-web"
    );

    // The leader dies: the standby takes the Lease once it expires, and carries on.
    drop(first.take());
    wait_until(
        "controller-1 to take the Lease",
        Duration::from_secs(30),
        || holder() == "controller-1",
    );
    image_set_with_secret("api", "registry-api");
    let copy = coral::controller::secrets::copy_name("shop", "registry-api");
    wait_for(
        &plane,
        "the new leader's pull-secret copy",
        &["get", "secret", &copy, "-n", "coral-system", "-o", "json"],
    );
    wait_until(
        "the new leader's ImageSet status",
        Duration::from_secs(30),
        || {
            let output = plane.kubectl(&[
                "get",
                "imageset",
                "api",
                "-n",
                "shop",
                "-o",
                "jsonpath={.status.imageCount}",
            ]);
            output.stdout == b"1"
        },
    );
}

/// A second mutating webhook, in this process: it adds an init container running
/// `nginx:1.28` to the Deployments it is sent, over the webhook's own TLS and HTTP stack.
struct SecondWebhook {
    port: u16,
    authority: support::Authority,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl SecondWebhook {
    fn start() -> Self {
        use axum::body::Bytes;
        use coral::webhook::admission::Review;

        let dir = tempfile::tempdir().unwrap();
        let authority = support::Authority::new();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        authority.issue(&cert, &key);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls =
            std::sync::Arc::new(coral::webhook::tls::ReloadingCert::load(&cert, &key).unwrap());
        let tls =
            tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls.server_config().unwrap()));
        let app = axum::Router::new().route(
            "/mutate",
            axum::routing::post(|body: Bytes| async move {
                let review = Review::parse(&body).unwrap();
                let patch = json!([{"op": "add", "path": "/spec/template/spec/initContainers",
                                    "value": [{"name": "setup", "image": "nginx:1.28"}]}]);
                axum::Json(json!({
                    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {
                        "uid": review.uid, "allowed": true, "patchType": "JSONPatch",
                        "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
                    },
                }))
            }),
        );
        runtime.spawn(coral::webhook::accept_https(
            listener,
            tls,
            app,
            Duration::from_secs(5),
            std::future::pending::<()>(),
        ));
        Self {
            port,
            authority,
            runtime: Some(runtime),
            _dir: dir,
        }
    }
}

impl Drop for SecondWebhook {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// `coral audit` of the cluster as the admin; its exit code and standard output.
fn audit(plane: &ControlPlane, args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_coral"))
        .arg("audit")
        .args(args)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("KUBERNETES_SERVICE_HOST", "")
        .output()
        .unwrap();
    (
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// One containerd "node" with its `coral agent`.
struct AgentNode {
    name: String,
    containerd: runtime::Containerd,
    metrics: std::net::SocketAddr,
    kubeconfig: std::path::PathBuf,
    agent: Option<support::process::Kill>,
    /// Successful pulls of the agent's earlier lives.
    pulls_before: u64,
}

impl AgentNode {
    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    fn start_agent_with(&mut self, extra: &[&str]) {
        self.agent = Some(support::process::Kill(
            std::process::Command::new(env!("CARGO_BIN_EXE_coral"))
                .args(["agent", "--node-name", &self.name, "--debounce", "50ms"])
                .args(extra)
                .args(["--cri-socket", &self.containerd.address()])
                .args(["--probe-listen", &self.metrics.to_string()])
                .args(["--initial-backoff", "500ms", "--max-backoff", "2s"])
                .args(["--resync", "2s"])
                .env("KUBECONFIG", &self.kubeconfig)
                .env("KUBERNETES_SERVICE_HOST", "")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }

    /// Successful pulls of the running agent, from its metrics.
    fn pulls(&self) -> u64 {
        http_get(self.metrics, "/metrics")
            .lines()
            .find_map(|line| {
                line.strip_prefix(r#"coral_agent_pulls_total{result="success"} "#)?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    fn kill_agent(&mut self) {
        self.pulls_before += self.pulls();
        self.agent = None;
    }
}

/// Coral running whole against the real control plane, and what the test has seen of it.
struct System {
    plane: ControlPlane,
    registry: runtime::Registry,
    nodes: Vec<AgentNode>,
    controllers: Vec<(String, Option<support::process::Kill>)>,
    webhook: Option<Webhook>,
    webhook_kubeconfig: std::path::PathBuf,
    /// The images the ImageSet asks for, in order.
    wanted: Vec<String>,
    /// The policy version the webhook must end up answering with.
    policies: String,
    /// Per node, the image labels seen once the system converged: none may go.
    held: Vec<BTreeSet<String>>,
    tokio: tokio::runtime::Runtime,
    answered: usize,
    unanswered: usize,
}

/// What the probe asks the webhook: a Pod of the two first images, steering asked for.
fn probe_review(images: &[String]) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "probe", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "name": "probe", "operation": "CREATE",
            "userInfo": {"username": "admin"}, "dryRun": false,
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "probe", "namespace": "shop",
                             "annotations": {"coral.dev/inject": "selectors"}},
                "spec": {"containers": images.iter().enumerate()
                    .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
                    .collect::<Vec<_>>()}},
        }
    })
}

impl System {
    fn set_images(&mut self, images: &[String]) {
        self.wanted = images.to_vec();
        let patch = json!({"spec": {"images": images}}).to_string();
        self.plane.kubectl_ok(&[
            "patch",
            "imageset",
            "shop",
            "-n",
            "shop",
            "--type=merge",
            "-p",
            &patch,
        ]);
    }

    fn start_webhook(&mut self) {
        let webhook = Webhook::start_with_kubeconfig(
            &self.webhook_kubeconfig,
            &[
                "--policies-configmap",
                "coral-system/coral-policies",
                "--debounce-ms",
                "100",
            ],
        );
        self.webhook = Some(webhook);
    }

    fn policy_configmap(&self, version: &str) {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir("policies").unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        std::fs::write(
            dir.path().join("version.rego"),
            format!("package coral.mutate\n\nwarn contains \"policies {version}\" if true\n"),
        )
        .unwrap();
        let from = format!("--from-file={}", dir.path().display());
        let manifest = self.plane.kubectl_ok(&[
            "create",
            "configmap",
            "coral-policies",
            "-n",
            "coral-system",
            &from,
            "--dry-run=client",
            "-o",
            "json",
        ]);
        let configmap: Value = serde_json::from_str(&manifest).unwrap();
        let output = self.plane.kubectl_stdin(&["apply"], &configmap);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The image labels of each node; `None` while the API server does not answer.
    fn node_labels(&self) -> Option<Vec<BTreeSet<String>>> {
        let output = self.plane.kubectl(&["get", "nodes", "-o", "json"]);
        let list: Value = serde_json::from_slice(&output.stdout).ok()?;
        let items = list["items"].as_array()?;
        self.nodes
            .iter()
            .map(|node| {
                let item = items.iter().find(|i| i["metadata"]["name"] == node.name)?;
                let labels = item["metadata"]["labels"].as_object()?;
                Some(
                    labels
                        .iter()
                        .filter(|(key, value)| {
                            key.starts_with("image.coral.dev/") && *value == "available"
                        })
                        .map(|(key, _)| key.clone())
                        .collect(),
                )
            })
            .collect()
    }

    /// One look at the system while it converges: no label it held went, and the webhook,
    /// when it answers, steers only to images some node holds.
    fn observe(&mut self) {
        let labels = self.node_labels();
        if let Some(labels) = &labels {
            for ((node, held), now) in self.nodes.iter().zip(&self.held).zip(labels) {
                let lost: Vec<_> = held.difference(now).collect();
                assert!(
                    lost.is_empty(),
                    "{} lost {lost:?}; its labels: {}",
                    node.name,
                    self.plane
                        .kubectl_ok(&["get", "node", &node.name, "--show-labels"])
                );
            }
        }
        let Some(webhook) = &self.webhook else {
            self.unanswered += 1;
            return;
        };
        let body = serde_json::to_vec(&probe_review(&self.wanted[..2])).unwrap();
        let answer = self.tokio.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                support::post(webhook, "/mutate", &body),
            )
            .await
        });
        let Ok((200, text)) = answer else {
            self.unanswered += 1;
            return;
        };
        self.answered += 1;
        let review: Value = serde_json::from_str(&text).unwrap();
        let response = &review["response"];
        assert_eq!(response["allowed"], true, "{response}");
        let Some(patch) = response["patch"].as_str() else {
            return;
        };
        let patch: Vec<Value> = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(patch)
                .unwrap(),
        )
        .unwrap();
        // The labels as they are now: they only come, so one a node lacks now, it lacked when
        // the webhook answered.
        let Some(labels) = self.node_labels() else {
            return;
        };
        for operation in &patch {
            let mut keys: Vec<String> = Vec::new();
            let path = operation["path"].as_str().unwrap_or_default();
            if path == "/spec/nodeSelector" {
                keys.extend(
                    operation["value"]
                        .as_object()
                        .into_iter()
                        .flat_map(|m| m.keys().cloned()),
                );
            } else if let Some(key) = path.strip_prefix("/spec/nodeSelector/") {
                keys.push(key.replace("~1", "/").replace("~0", "~"));
            }
            for key in keys.iter().filter(|k| k.starts_with("image.coral.dev/")) {
                assert!(
                    labels.iter().any(|held| held.contains(key)),
                    "the webhook steered to {key}, which no node holds: {response}"
                );
            }
        }
    }

    /// Whether every part agrees on the wanted images; the first disagreement otherwise.
    fn converged(&mut self) -> Result<(), String> {
        let keys: BTreeSet<String> = self.wanted.iter().map(|image| label(image)).collect();
        let labels = self.node_labels().ok_or("the API server does not answer")?;
        for (node, held) in self.nodes.iter().zip(&labels) {
            if *held != keys {
                return Err(format!("{} is labelled {held:?}", node.name));
            }
            let output = self
                .plane
                .kubectl(&["get", "nodeimage", &node.name, "-o", "json"]);
            let status: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            if status["status"]["available"] != self.wanted.len() {
                return Err(format!("NodeImage {}: {}", node.name, status["status"]));
            }
            let address = node.containerd.address();
            let images = self
                .tokio
                .block_on(async {
                    let cri = coral::agent::cri::Cri::new(&address).unwrap();
                    cri.list_images().await
                })
                .map_err(|e| e.to_string())?;
            for image in &self.wanted {
                if !images.iter().any(|held| held.repo_tags.contains(image)) {
                    return Err(format!("containerd of {} lacks {image}", node.name));
                }
            }
        }
        let status = &image_set_status(&self.plane);
        let ready = status["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
            .unwrap_or(Value::Null);
        let all = status["images"].as_array().is_some_and(|images| {
            images.len() == self.wanted.len()
                && images
                    .iter()
                    .all(|i| i["nodesAvailable"] == 3 && i["nodesTargeted"] == 3)
        });
        if status["imageCount"] != self.wanted.len() || !all || ready["status"] != "True" {
            return Err(format!("ImageSet status {status}"));
        }
        if let Some(webhook) = &self.webhook {
            let body = serde_json::to_vec(&probe_review(&self.wanted[..2])).unwrap();
            let answer = self
                .tokio
                .block_on(support::post(webhook, "/mutate", &body));
            let wanted = format!("policies {}", self.policies);
            if !answer.1.contains(&wanted) {
                return Err(format!(
                    "the webhook does not answer with {wanted}: {}",
                    answer.1
                ));
            }
        } else {
            return Err("no webhook".into());
        }
        self.held = labels;
        Ok(())
    }

    /// Waits until the system converges, watching it; prints and returns how long it took.
    fn settle(&mut self, fault: &str, since: Instant) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = String::new();
        loop {
            self.observe();
            match self.converged() {
                Ok(()) => break,
                Err(why) if Instant::now() > deadline => panic!("{fault}: not converged: {why}"),
                Err(why) => {
                    if why != last {
                        let short: String = why.chars().take(160).collect();
                        println!("  {:.1} s: {short}", since.elapsed().as_secs_f64());
                        last = why;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        let took = since.elapsed();
        println!(
            "fault: {fault}: converged {:.1} s after it",
            took.as_secs_f64()
        );
        took
    }
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_whole_system_converges_after_each_component_is_killed() {
    let plane = injecting_control_plane();
    let registry = runtime::Registry::start(None);
    // app-3 is large enough (30 MB of random bytes) that killing its agent catches the pull.
    let mut random = String::with_capacity(60 << 20);
    for _ in 0..(30 << 20) / 8 {
        random.push_str(&format!("{:016x}", fastrand::u64(..)));
    }
    let images: Vec<String> = (1..=6)
        .map(|i| {
            let content = if i == 3 {
                random.clone()
            } else {
                format!("app {i}")
            };
            registry.push(&format!("shop/app-{i}"), "1.0", &content)
        })
        .collect();
    drop(random);

    let agent_kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-agent");
    let nodes = (0..3)
        .map(|i| {
            let name = format!("node-{i}");
            plane.node(&name, json!({"pool": "web"}), json!([]), false);
            AgentNode {
                name,
                containerd: runtime::Containerd::start(),
                metrics: free_address(),
                kubeconfig: agent_kubeconfig.clone(),
                agent: None,
                pulls_before: 0,
            }
        })
        .collect();
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {"images": images[..2], "nodeSelector": {"matchLabels": {"pool": "web"}}},
    });
    assert!(
        plane
            .kubectl_stdin(&["create"], &image_set)
            .status
            .success()
    );
    let webhook_kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-webhook");
    let mut system = System {
        controllers: ["controller-0", "controller-1"]
            .iter()
            .map(|name| (name.to_string(), Some(start_controller(&plane, name))))
            .collect(),
        plane,
        registry,
        nodes,
        webhook: None,
        webhook_kubeconfig,
        wanted: images[..2].to_vec(),
        policies: "v1".into(),
        held: vec![BTreeSet::new(); 3],
        tokio: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        answered: 0,
        unanswered: 0,
    };
    system.policy_configmap("v1");
    for node in &mut system.nodes {
        node.start_agent();
    }
    system.start_webhook();
    let started = Instant::now();
    system.settle("none (start)", started);
    let mut times = Vec::new();

    // An agent killed while it pulls a 30 MB image, and started again.
    system.set_images(&images[..3]);
    let fault = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    system.nodes[0].kill_agent();
    std::thread::sleep(Duration::from_secs(1));
    system.observe();
    system.nodes[0].start_agent();
    times.push(("agent mid-pull", system.settle("agent mid-pull", fault)));

    // The leading controller killed as it reconciles a change; the standby takes the Lease.
    let leader = lease_holder(&system.plane);
    system.set_images(&images[..4]);
    let fault = Instant::now();
    let index = system
        .controllers
        .iter()
        .position(|(name, _)| *name == leader)
        .unwrap();
    system.controllers[index].1 = None;
    times.push((
        "controller mid-reconcile",
        system.settle("controller mid-reconcile, the Lease taken over", fault),
    ));
    let holder = lease_holder(&system.plane);
    assert_ne!(holder, leader, "the standby holds the Lease");
    let name = system.controllers[index].0.clone();
    system.controllers[index].1 = Some(start_controller(&system.plane, &name));

    // The webhook killed while it reloads a new policy ConfigMap, and started again.
    let fault = Instant::now();
    system.policies = "v2".into();
    system.policy_configmap("v2");
    std::thread::sleep(Duration::from_millis(150));
    system.webhook = None;
    system.observe();
    system.start_webhook();
    times.push((
        "webhook mid-reload",
        system.settle("webhook during a policy reload", fault),
    ));

    // The registry down while the agents pull a new image.
    system.set_images(&images[..5]);
    let fault = Instant::now();
    system.registry.stop();
    for _ in 0..10 {
        system.observe();
        std::thread::sleep(Duration::from_millis(200));
    }
    system.registry.resume();
    times.push((
        "registry mid-pull",
        system.settle("registry during pulls", fault),
    ));

    // A node's containerd killed and started again: its images stay, and so do its labels.
    let fault = Instant::now();
    system.nodes[1].containerd.stop();
    for _ in 0..10 {
        system.observe();
        std::thread::sleep(Duration::from_millis(200));
    }
    system.nodes[1].containerd.resume();
    times.push(("containerd", system.settle("containerd", fault)));

    // The API server killed: the webhook answers from what it knows; then a change.
    let fault = Instant::now();
    system.plane.kill("kube-apiserver");
    for _ in 0..10 {
        system.observe();
        std::thread::sleep(Duration::from_millis(200));
    }
    system.plane.start_again("kube-apiserver");
    system.set_images(&images[..6]);
    times.push(("API server", system.settle("API server", fault)));

    // Nothing pulled twice: each node pulled each image once, whatever was killed.
    for node in &system.nodes {
        let pulls = node.pulls_before + node.pulls();
        assert!(
            pulls <= images.len() as u64,
            "{} pulled {pulls} times for {} images",
            node.name,
            images.len()
        );
    }
    println!(
        "faults: {} injected, convergence {}; webhook probes: {} answered (every one right), {} while it was down",
        times.len(),
        times
            .iter()
            .map(|(what, took)| format!("{what} {:.1} s", took.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        system.answered,
        system.unanswered,
    );
}

/// `kubectl coral …` through kubectl's plugin mechanism: `kubectl-coral` on the PATH.
fn kubectl_coral(plane: &ControlPlane, plugins: &std::path::Path, args: &[&str]) -> String {
    let path = format!(
        "{}:{}",
        plugins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = std::process::Command::new("kubectl")
        .arg("coral")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("KUBERNETES_SERVICE_HOST", "")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kubectl coral {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn kubectl_coral_answers_status_why_and_nodes_from_the_live_cluster() {
    let plane = injecting_control_plane();
    let plugins = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_coral"),
        plugins.path().join("kubectl-coral"),
    )
    .unwrap();
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"images": ["nginx:1.27", "redis:7.4"], "nodeSelector": {"matchLabels": {"pool": "web"}}},
    });
    assert!(
        plane
            .kubectl_stdin(&["create"], &image_set)
            .status
            .success()
    );
    let mut held = json!({"pool": "web"});
    held[label("nginx:1.27")] = json!("available");
    plane.node("node-a", held, json!([]), false);
    plane.node("node-b", json!({"pool": "web"}), json!([]), false);
    // node-b's agent could not pull redis.
    let node_image = json!({"apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
        "metadata": {"name": "node-b"}, "spec": {"nodeName": "node-b"}});
    assert!(
        plane
            .kubectl_stdin(&["create"], &node_image)
            .status
            .success()
    );
    let status = json!({"status": {"available": 0, "pulling": 0, "failed": 1, "conditions": [],
        "images": [{"image": "docker.io/library/redis:7.4", "label": label("redis:7.4"),
                    "state": "failed", "attempts": 5,
                    "lastError": "pull access denied for redis"}]}});
    plane.kubectl_ok(&[
        "patch",
        "nodeimage",
        "node-b",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let _controller = start_controller(&plane, "controller-0");
    wait_until("the ImageSet's status", Duration::from_secs(30), || {
        image_set_status_of(&plane, "web")["imageCount"] == 2
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop",
                     "annotations": {"coral.dev/inject": "selectors"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [
                                  {"name": "web", "image": "nginx:1.27"},
                                  {"name": "cache", "image": "redis:7.4"},
                                  {"name": "tools", "image": "busybox:1.36"}]}}},
    });
    assert!(
        plane
            .kubectl_stdin(&["create"], &deployment)
            .status
            .success()
    );

    let status = kubectl_coral(&plane, plugins.path(), &["status"]);
    println!("{status}");
    assert!(status.contains("shop/web  Ready: False"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.contains("nginx:1.27") && l.contains("1/2")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.contains("redis:7.4") && l.contains("1 failed")),
        "{status}"
    );

    let why = kubectl_coral(
        &plane,
        plugins.path(),
        &["why", "deployment/web", "-n", "shop"],
    );
    println!("{why}");
    assert!(why.contains("policies: embedded"), "{why}");
    assert!(why.contains("Deployment shop/web: "), "{why}");
    assert!(
        why.contains(&label("nginx:1.27")),
        "steered to nginx: {why}"
    );
    assert!(
        why.contains("nginx:1.27: managed by shop/web; on 1 of 2 targeted node(s)"),
        "{why}"
    );
    assert!(
        why.contains("redis:7.4: managed by shop/web; on 0 of 2 targeted node(s)"),
        "{why}"
    );
    assert!(why.contains("failed on 1"), "{why}");
    assert!(why.contains("busybox:1.36: unmanaged"), "{why}");
    assert!(why.contains("warning: "), "the policies say why: {why}");

    let nodes = kubectl_coral(&plane, plugins.path(), &["nodes", "redis:7.4"]);
    println!("{nodes}");
    assert!(
        nodes.contains("node-b") && nodes.contains("failed after 5 attempt(s): pull access denied"),
        "{nodes}"
    );
    assert!(nodes.contains("0 of 2 node(s) hold it"), "{nodes}");
    let nodes = kubectl_coral(&plane, plugins.path(), &["nodes", "nginx:1.27"]);
    assert!(
        nodes.contains("node-a") && nodes.contains("1 of 2 node(s) hold it"),
        "{nodes}"
    );
}

fn image_set_status_of(plane: &ControlPlane, name: &str) -> Value {
    let output = plane.kubectl(&["get", "imageset", name, "-n", "shop", "-o", "json"]);
    serde_json::from_slice::<Value>(&output.stdout)
        .map(|set| set["status"].clone())
        .unwrap_or(Value::Null)
}

/// The mirror status of the one image of ImageSet `shop/mirrored`, and its `Mirrored`
/// condition's status.
fn mirror_status(plane: &ControlPlane) -> (Value, String) {
    let status = image_set_status_of(plane, "mirrored");
    let condition = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Mirrored")
        .map(|c| c["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    (status["images"][0]["mirror"].clone(), condition)
}

/// A Registry as the API server has it.
fn registry_object(plane: &ControlPlane, name: &str) -> Value {
    serde_json::from_str(&plane.kubectl_ok(&["get", "registry", name, "-o", "json"])).unwrap()
}

/// A controller that checks mirrored tags every 2 s and probes Registries every second, and
/// the address of its metrics.
fn start_mirroring_controller(
    plane: &ControlPlane,
    name: &str,
) -> (support::process::Kill, std::net::SocketAddr) {
    let probe = free_address();
    let flags = [
        "--mirror-recheck",
        "2s",
        "--registry-probe-interval",
        "1s",
        "--probe-listen",
        &probe.to_string(),
    ];
    (start_controller_with(plane, name, &flags), probe)
}

/// `kubectl apply` of one object, which must succeed.
fn apply(plane: &ControlPlane, object: &Value) {
    let output = plane.kubectl_stdin(&["apply"], object);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A metric's value in a Prometheus exposition (the first series whose line starts so).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_controller_mirrors_into_a_registry_follows_a_moved_tag_and_resumes_after_a_restart() {
    const USER: &str = "coral";
    const PASSWORD: &str = "s3cret";
    let plane = coral_control_plane(&[]);
    // The source and the mirror both want credentials: the source's come from the ImageSet's
    // pull secret (the controller's copy), the mirror's from the Registry's secret.
    let mut source = runtime::Registry::start(Some((USER, PASSWORD)));
    let mut mirror = runtime::Registry::start(Some((USER, PASSWORD)));
    let reference = source.push("shop/app", "1.0", "app one");
    assert_eq!(reference, format!("{}/shop/app:1.0", source.host()));
    // Pods pull by the endpoint (as nodes reach it); Coral copies through the push endpoint.
    let endpoint = format!("localhost:{}", mirror.port);
    let path = format!("{}/shop/app:1.0", source.host().replace(':', "_"));
    let mirror_reference = format!("{endpoint}/{path}");
    for (namespace, name, host) in [
        ("shop", "source-pull", source.host()),
        ("coral-system", "mirror-push", mirror.host()),
    ] {
        plane.kubectl_ok(&[
            "create",
            "secret",
            "docker-registry",
            name,
            "-n",
            namespace,
            &format!("--docker-server={host}"),
            &format!("--docker-username={USER}"),
            &format!("--docker-password={PASSWORD}"),
        ]);
    }
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1",
            "kind": "Registry",
            "metadata": {"name": "local"},
            "spec": {
                "endpoint": endpoint, "pushEndpoint": mirror.host(),
                "credentialsSecret": "mirror-push",
                // Pods cannot read it without credentials: it may hold the private image.
                "privateImages": true,
            },
        }),
    );
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1",
            "kind": "ImageSet",
            "metadata": {"name": "mirrored", "namespace": "shop"},
            "spec": {
                "images": [reference],
                "imagePullSecrets": [{"name": "source-pull"}],
                "mirror": {"registry": "local"},
                // Mirror only: no node is selected.
                "nodeSelector": {"matchLabels": {"coral.dev/mirror-only": "true"}},
            },
        }),
    );
    let (controller, probe) = start_mirroring_controller(&plane, "controller-0");
    let started = Instant::now();
    wait_until("the image mirrored", Duration::from_secs(60), || {
        let (status, condition) = mirror_status(&plane);
        status["state"] == "mirrored" && condition == "True"
    });
    println!(
        "mirrored {:.1} s after the controller started",
        started.elapsed().as_secs_f64()
    );
    let (status, _) = mirror_status(&plane);
    assert_eq!(status["reference"], mirror_reference.as_str());
    let source_digest = source.manifest_digest(&reference);
    assert_eq!(status["sourceDigest"], source_digest.as_str());
    assert_eq!(status["digest"], source_digest.as_str());
    assert_eq!(
        mirror.manifest_digest(&format!("{}/{path}", mirror.host())),
        source_digest,
        "the mirror serves the source's manifest, digest kept"
    );
    wait_until(
        "the Registry reachable with one image",
        Duration::from_secs(30),
        || {
            let registry = registry_object(&plane, "local");
            registry["status"]["mirroredImages"] == 1
                && registry["status"]["conditions"][0]["status"] == "True"
        },
    );
    let metrics = http_get(probe, "/metrics");
    assert!(
        metric(
            &metrics,
            "coral_mirror_bytes_copied_total{registry=\"local\"}"
        )
        .is_some_and(|b| b > 0.0),
        "{metrics}"
    );

    // The tag moves at the source: the next check copies the new image.
    source.push("shop/app", "1.0", "app two");
    let moved = source.manifest_digest(&reference);
    assert_ne!(moved, source_digest);
    wait_until("the moved tag copied", Duration::from_secs(30), || {
        mirror_status(&plane).0["digest"] == moved.as_str()
    });

    // A restart: the new leader takes up the status and copies nothing (the mirror holds
    // everything), and the image never goes back to copying.
    drop(controller);
    let (_controller, probe) = start_mirroring_controller(&plane, "controller-1");
    wait_until(
        "the new leader checked the image",
        Duration::from_secs(30),
        || {
            let metrics = http_get(probe, "/metrics");
            // (Null: the status could not be read this time, under load.)
            let state = mirror_status(&plane).0["state"].clone();
            assert!(state.is_null() || state == "mirrored", "{state}");
            metric(
                &metrics,
                "coral_mirror_copy_duration_seconds_count{registry=\"local\"}",
            )
            .is_some_and(|n| n >= 2.0)
        },
    );
    let metrics = http_get(probe, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "coral_mirror_bytes_copied_total{registry=\"local\"}"
        ),
        Some(0.0),
        "{metrics}"
    );

    // The source down: the mirrored copy stays usable, the error is shown.
    source.stop();
    wait_until(
        "the source's failure recorded",
        Duration::from_secs(30),
        || {
            let (status, condition) = mirror_status(&plane);
            status["state"] == "mirrored"
                && condition == "True"
                && status["lastError"]
                    .as_str()
                    .is_some_and(|e| e.contains("reading the manifest of"))
        },
    );
    // The mirror down: the Registry is unreachable, then reachable again.
    mirror.stop();
    wait_until("the Registry unreachable", Duration::from_secs(30), || {
        let registry = registry_object(&plane, "local");
        registry["status"]["conditions"][0]["status"] == "False"
            && registry["status"]["lastError"].as_str().is_some()
    });
    mirror.resume();
    source.resume();
    wait_until(
        "the Registry reachable again and the error gone",
        Duration::from_secs(30),
        || {
            let registry = registry_object(&plane, "local");
            registry["status"]["conditions"][0]["status"] == "True"
                && mirror_status(&plane).0["lastError"].is_null()
        },
    );
}

/// What the webhook answers for a Pod in `shop` of one container running `image`, with the
/// `coral.dev/inject` annotation `inject`: its patch operations and warnings.
fn review_pod(
    webhook: &Webhook,
    runtime: &tokio::runtime::Runtime,
    image: &str,
    inject: &str,
) -> (Vec<Value>, Vec<String>) {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "mirror", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "name": "app", "operation": "CREATE",
            "userInfo": {"username": "admin"}, "dryRun": false,
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "app", "namespace": "shop", "annotations": {"coral.dev/inject": inject}},
                "spec": {"containers": [{"name": "app", "image": image}]}},
        }
    });
    let body = serde_json::to_vec(&review).unwrap();
    let (status, text) = runtime.block_on(support::post(webhook, "/mutate", &body));
    assert_eq!(status, 200, "{text}");
    let review: Value = serde_json::from_str(&text).unwrap();
    let response = &review["response"];
    assert_eq!(response["allowed"], true, "{response}");
    let patch = response["patch"]
        .as_str()
        .map(|p| {
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(p).unwrap())
                .unwrap()
        })
        .unwrap_or_default();
    let warnings = response["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect();
    (patch, warnings)
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_pod_runs_the_mirrors_copy_which_containerd_pulls_with_the_source_stopped() {
    let plane = coral_control_plane(&[]);
    let mut source = runtime::Registry::start(None);
    let mut mirror = runtime::Registry::start(None);
    let app = source.push("shop/app", "1.0", "served from the mirror");
    let secret = source.push("shop/secret", "1.0", "private");
    let mirror_ref = format!(
        "{}/{}/shop/app:1.0",
        mirror.host(),
        source.host().replace(':', "_")
    );
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
            "metadata": {"name": "local"},
            "spec": {"endpoint": mirror.host()},
        }),
    );
    let nowhere = json!({"matchLabels": {"coral.dev/mirror-only": "true"}});
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "cache", "namespace": "shop"},
            "spec": {"images": [app], "mirror": {"registry": "local"}, "nodeSelector": nowhere},
        }),
    );
    // A private image (pulled with a pull secret) is not copied into a Registry that does not
    // take private images, nor into one anyone reads.
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
            "metadata": {"name": "open"},
            "spec": {"endpoint": mirror.host(), "privateImages": true},
        }),
    );
    plane.kubectl_ok(&[
        "create",
        "secret",
        "docker-registry",
        "source-pull",
        "-n",
        "shop",
        &format!("--docker-server={}", source.host()),
        "--docker-username=coral",
        "--docker-password=s3cret",
    ]);
    for (name, registry) in [("private", "local"), ("private-open", "open")] {
        apply(
            &plane,
            &json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {
                    "images": [secret], "imagePullSecrets": [{"name": "source-pull"}],
                    "mirror": {"registry": registry}, "nodeSelector": nowhere,
                },
            }),
        );
    }
    let _controller = start_controller_with(
        &plane,
        "controller-0",
        &[
            "--registry-probe-interval",
            "1s",
            "--probe-listen",
            "127.0.0.1:0",
        ],
    );
    wait_until("the public image mirrored", Duration::from_secs(60), || {
        image_set_status_of(&plane, "cache")["images"][0]["mirror"]["state"] == "mirrored"
    });
    for (name, why) in [
        (
            "private",
            "does not take private images (spec.privateImages)",
        ),
        ("private-open", "serves pulls without credentials"),
    ] {
        wait_until("the private image refused", Duration::from_secs(30), || {
            let status = image_set_status_of(&plane, name)["images"][0]["mirror"].clone();
            status["state"] == "failed"
                && status["lastError"]
                    .as_str()
                    .is_some_and(|e| e.contains(why))
        });
    }
    assert!(
        !mirror.manifest_exists(&format!(
            "{}/{}/shop/secret:1.0",
            mirror.host(),
            source.host().replace(':', "_")
        )),
        "the private image never reached the open mirror"
    );

    let kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-webhook");
    let webhook = Webhook::start_with_kubeconfig(&kubeconfig, &["--debounce-ms", "50"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let to_mirror =
        json!({"op": "replace", "path": "/spec/containers/0/image", "value": mirror_ref});
    wait_until(
        "the webhook runs the mirror's copy",
        Duration::from_secs(30),
        || {
            runtime.block_on(get_probe(&webhook, "/readyz")).0 == 200
                && review_pod(&webhook, &runtime, &app, "mirror").0 == vec![to_mirror.clone()]
        },
    );
    let (patch, _) = review_pod(&webhook, &runtime, &secret, "mirror");
    assert!(
        patch.is_empty(),
        "a private image stays on its source: {patch:?}"
    );

    // The source stopped, a real containerd pulls what the pod now runs.
    source.stop();
    let containerd = runtime::Containerd::start();
    let (ok, text) = containerd.prefetch(std::slice::from_ref(&mirror_ref), &[]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("pulled     {mirror_ref}")), "{text}");

    // The mirror down: once the Registry is seen unreachable, a new pod keeps its source and
    // a pod already rewritten gets its source back.
    source.resume();
    mirror.stop();
    let back = json!({"op": "replace", "path": "/spec/containers/0/image", "value": app});
    wait_until(
        "the webhook falls back to the source",
        Duration::from_secs(30),
        || review_pod(&webhook, &runtime, &mirror_ref, "mirror").0 == vec![back.clone()],
    );
    let (patch, warnings) = review_pod(&webhook, &runtime, &app, "mirror");
    assert!(patch.is_empty(), "{patch:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("is not ready in mirror Registry local")),
        "{warnings:?}"
    );
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_registry_with_its_own_ca_is_mirrored_into_over_https_and_another_ca_is_refused() {
    let plane = coral_control_plane(&[]);
    let source = runtime::Registry::start(None);
    let app = source.push("shop/app", "1.0", "over https");
    let dir = tempfile::tempdir().unwrap();
    let authority = support::Authority::new();
    let (certificate, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    authority.issue(&certificate, &key);
    let mirror = runtime::Registry::start_tls(&certificate, &key);
    for (secret, pem) in [
        ("registry-ca", authority.pem()),
        ("other-ca", support::Authority::new().pem()),
    ] {
        let file = dir.path().join(format!("{secret}.crt"));
        std::fs::write(&file, pem).unwrap();
        plane.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            secret,
            "-n",
            "coral-system",
            &format!("--from-file=ca.crt={}", file.display()),
        ]);
    }
    let nowhere = json!({"matchLabels": {"coral.dev/mirror-only": "true"}});
    for (name, ca) in [("trusted", "registry-ca"), ("untrusted", "other-ca")] {
        apply(
            &plane,
            &json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
                "metadata": {"name": name},
                "spec": {"endpoint": mirror.host(), "tls": {"caSecret": {"name": ca}}},
            }),
        );
        apply(
            &plane,
            &json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"images": [app], "mirror": {"registry": name}, "nodeSelector": nowhere},
            }),
        );
    }
    let (_controller, probe) = start_mirroring_controller(&plane, "controller-0");
    wait_until(
        "the image mirrored over HTTPS",
        Duration::from_secs(60),
        || image_set_status_of(&plane, "trusted")["images"][0]["mirror"]["state"] == "mirrored",
    );
    wait_until("the other CA refused", Duration::from_secs(30), || {
        let status = image_set_status_of(&plane, "untrusted")["images"][0]["mirror"].clone();
        let registry = registry_object(&plane, "untrusted");
        status["state"] == "failed"
            && registry["status"]["conditions"][0]["status"] == "False"
            && registry["status"]["lastError"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("certificate"))
    });
    assert_eq!(
        registry_object(&plane, "trusted")["status"]["conditions"][0]["status"],
        "True"
    );
    // A deleted Registry leaves no reachability series behind (its alert would fire on).
    let untrusted = "coral_registry_reachable{registry=\"untrusted\"}";
    assert!(http_get(probe, "/metrics").contains(&format!("{untrusted} 0")));
    plane.kubectl_ok(&["delete", "registry", "untrusted"]);
    wait_until(
        "the deleted Registry's series gone",
        Duration::from_secs(30),
        || {
            let metrics = http_get(probe, "/metrics");
            metrics.contains("coral_registry_reachable{registry=\"trusted\"} 1")
                && !metrics.contains(untrusted)
        },
    );
}

/// The condition `kind` of a status, as (status, message).
fn condition_of(status: &Value, kind: &str) -> (String, String) {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_moved_tag_drifts_across_two_nodes_until_spec_refresh_and_pin_runs_the_agreed_digest() {
    let plane = coral_control_plane(&[]);
    let registry = runtime::Registry::start(None);
    let app = registry.push("shop/app", "1", "first");
    let first = registry.manifest_digest(&app);
    let kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-agent");
    let mut nodes: Vec<AgentNode> = ["node-a", "node-b"]
        .iter()
        .map(|name| {
            plane.node(name, json!({"pool": "web"}), json!([]), false);
            AgentNode {
                name: name.to_string(),
                containerd: runtime::Containerd::start(),
                metrics: free_address(),
                kubeconfig: kubeconfig.clone(),
                agent: None,
                pulls_before: 0,
            }
        })
        .collect();
    let image_set = |refresh: Option<&str>| {
        let mut spec = json!({"images": [app], "nodeSelector": {"matchLabels": {"pool": "web"}}});
        if let Some(refresh) = refresh {
            spec["refresh"] = json!(refresh);
        }
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "drift", "namespace": "shop"}, "spec": spec,
        })
    };
    apply(&plane, &image_set(None));
    let probe = free_address();
    let _controller = start_controller_with(
        &plane,
        "controller-0",
        &["--probe-listen", &probe.to_string()],
    );

    // node-a pulls the tag, which then moves; node-b, starting later, pulls where it is now.
    nodes[0].start_agent();
    wait_until(
        "node-a holds the first digest",
        Duration::from_secs(60),
        || {
            let status = image_set_status_of(&plane, "drift");
            status["images"][0]["nodesAvailable"] == 1 && status["images"][0]["digest"] == first
        },
    );
    registry.push("shop/app", "1", "second");
    let second = registry.manifest_digest(&app);
    nodes[1].start_agent();
    wait_until("DigestDrift", Duration::from_secs(60), || {
        let status = image_set_status_of(&plane, "drift");
        condition_of(&status, "DigestDrift").0 == "True"
    });
    let status = image_set_status_of(&plane, "drift");
    let (_, message) = condition_of(&status, "DigestDrift");
    assert!(
        message.contains(&first) && message.contains(&second),
        "{message}"
    );
    assert_eq!(status["images"][0]["nodesDiffering"], 1, "{status}");
    assert_eq!(
        status["images"][0]["digests"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    wait_until("the drift metric", Duration::from_secs(30), || {
        metric(
            &http_get(probe, "/metrics"),
            "coral_controller_drifting_images",
        ) == Some(1.0)
    });

    // With drift the webhook pins nothing, and says why.
    let webhook_kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-webhook");
    let webhook = Webhook::start_with_kubeconfig(&webhook_kubeconfig, &["--debounce-ms", "50"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    wait_until(
        "the webhook sees the drift",
        Duration::from_secs(30),
        || {
            runtime.block_on(get_probe(&webhook, "/readyz")).0 == 200
                && review_pod(&webhook, &runtime, &app, "pin")
                    .1
                    .iter()
                    .any(|w| w.contains("held under different digests"))
        },
    );
    assert!(review_pod(&webhook, &runtime, &app, "pin").0.is_empty());

    // spec.refresh: node-a resolves the tag again and pulls what moved; the drift ends.
    apply(&plane, &image_set(Some("5s")));
    wait_until("the nodes agree", Duration::from_secs(60), || {
        let status = image_set_status_of(&plane, "drift");
        condition_of(&status, "DigestDrift").0 == "False"
            && status["images"][0]["digest"] == second
            && status["images"][0]["nodesDiffering"] == 0
    });
    let refreshes = |node: &AgentNode, result: &str| {
        metric(
            &http_get(node.metrics, "/metrics"),
            &format!("coral_agent_refreshes_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(refreshes(&nodes[0], "moved"), 1.0);
    // node-b held the moved tag already: its refreshes find nothing to pull.
    wait_until("node-b refreshed", Duration::from_secs(30), || {
        refreshes(&nodes[1], "unchanged") >= 1.0
    });
    assert_eq!(refreshes(&nodes[1], "moved"), 0.0);
    assert_eq!(nodes[1].pulls(), 1);

    // Now the webhook pins the digest both nodes hold, and a real containerd pulls it.
    let pinned = format!("{app}@{second}");
    let to_pinned = json!({"op": "replace", "path": "/spec/containers/0/image", "value": pinned});
    wait_until("the webhook pins", Duration::from_secs(30), || {
        review_pod(&webhook, &runtime, &app, "pin").0 == vec![to_pinned.clone()]
    });
    let containerd = runtime::Containerd::start();
    let (ok, text) = containerd.prefetch(std::slice::from_ref(&pinned), &[]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("pulled     {pinned}")), "{text}");
    wait_until("no drift in the metric", Duration::from_secs(30), || {
        metric(
            &http_get(probe, "/metrics"),
            "coral_controller_drifting_images",
        ) == Some(0.0)
    });
    for node in &mut nodes {
        node.kill_agent();
    }
}

/// The NodeImage status of a node.
fn node_image_status(plane: &ControlPlane, node: &str) -> Value {
    let output = plane.kubectl(&["get", "nodeimage", node, "-o", "json"]);
    serde_json::from_slice::<Value>(&output.stdout)
        .map(|n| n["status"].clone())
        .unwrap_or(Value::Null)
}

/// Whether the containerd of `node` holds `image`.
fn runtime_holds(node: &AgentNode, image: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        coral::agent::cri::Cri::new(&node.containerd.address())
            .unwrap()
            .image_status(image)
            .await
            .unwrap()
            .is_some()
    })
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_agent_removes_an_unwanted_image_after_its_grace_period_across_a_restart() {
    let plane = coral_control_plane(&[]);
    let registry = runtime::Registry::start(None);
    let keep = registry.push("shop/keep", "1", "keep");
    let old = registry.push("shop/old", "1", "old");
    plane.node("node-a", json!({"pool": "web"}), json!([]), false);
    let mut node = AgentNode {
        name: "node-a".into(),
        containerd: runtime::Containerd::start(),
        metrics: free_address(),
        kubeconfig: plane.service_account_kubeconfig("coral-system", "coral-agent"),
        agent: None,
        pulls_before: 0,
    };
    let image_set = |images: &[&String]| {
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "retention", "namespace": "shop"},
            "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": "web"}}},
        })
    };
    apply(&plane, &image_set(&[&keep, &old]));
    let _controller = start_controller(&plane, "controller-0");
    let grace = ["--unwanted-grace", "8s"];
    node.start_agent_with(&grace);
    wait_until("both images held", Duration::from_secs(60), || {
        node_image_status(&plane, "node-a")["available"] == 2
    });

    // `old` leaves the ImageSet: unwanted, recorded with its time, still on the runtime.
    apply(&plane, &image_set(&[&keep]));
    let left = Instant::now();
    wait_until("old recorded unwanted", Duration::from_secs(30), || {
        node_image_status(&plane, "node-a")["unwanted"][0]["image"] == old.as_str()
    });
    let since = node_image_status(&plane, "node-a")["unwanted"][0]["since"].clone();
    assert!(since.is_string());
    assert!(
        runtime_holds(&node, &old),
        "removed within its grace period"
    );

    // A restart within the grace period keeps when it became unwanted: the image goes once
    // the grace period that began before the restart ends.
    std::thread::sleep(Duration::from_secs(2));
    node.kill_agent();
    node.start_agent_with(&grace);
    wait_until(
        "the restarted agent took it up",
        Duration::from_secs(30),
        || http_get(node.metrics, "/metrics").contains("coral_agent_unwanted_images 1"),
    );
    assert_eq!(
        node_image_status(&plane, "node-a")["unwanted"][0]["since"],
        since
    );
    wait_until("old removed", Duration::from_secs(60), || {
        node_image_status(&plane, "node-a")["removals"][0]["image"] == old.as_str()
    });
    let waited = left.elapsed();
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(20),
        "removed {waited:?} after it left"
    );
    assert!(!runtime_holds(&node, &old));
    assert!(runtime_holds(&node, &keep));
    let status = node_image_status(&plane, "node-a");
    assert_eq!(status["removals"][0]["reason"], "grace", "{status}");
    assert!(status["unwanted"].is_null(), "{status}");
    let metrics = http_get(node.metrics, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "coral_agent_removed_images_total{reason=\"grace\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    node.kill_agent();
}

/// The digests of the layers of an image manifest.
fn layer_digests(manifest: &[u8]) -> Vec<String> {
    let manifest: Value = serde_json::from_slice(manifest).unwrap();
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect()
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_copy_no_imageset_mirrors_is_deleted_after_its_retention_unless_a_pod_runs_it() {
    let plane = coral_control_plane(&[]);
    let source = runtime::Registry::start(None);
    let mut mirror = runtime::Registry::start(None);
    let images: Vec<String> = ["kept", "running", "gone"]
        .iter()
        .map(|name| source.push(&format!("shop/{name}"), "1", name))
        .collect();
    let mirror_host = mirror.host();
    let copy = |image: &str| {
        format!(
            "{mirror_host}/{}",
            image.replace(&source.host(), &source.host().replace(':', "_"))
        )
    };
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
            "metadata": {"name": "local"}, "spec": {"endpoint": mirror.host()},
        }),
    );
    let image_set = |images: &[String]| {
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "mirrored", "namespace": "shop"},
            "spec": {"images": images, "mirror": {"registry": "local"},
                     "nodeSelector": {"matchLabels": {"coral.dev/mirror-only": "true"}}},
        })
    };
    apply(&plane, &image_set(&images));
    let probe = free_address();
    let flags = [
        "--mirror-retention",
        "3s",
        "--registry-probe-interval",
        "1s",
        "--probe-listen",
        &probe.to_string(),
    ];
    let _controller = start_controller_with(&plane, "controller-0", &flags);
    wait_until("all three mirrored", Duration::from_secs(60), || {
        let status = registry_object(&plane, "local")["status"].clone();
        status["mirroredImages"] == 3 && status["mirroredBytes"].as_i64().is_some_and(|b| b > 0)
    });
    let bytes_of_three = registry_object(&plane, "local")["status"]["mirroredBytes"]
        .as_i64()
        .unwrap();
    let gone_layers = layer_digests(&mirror.manifest(&copy(&images[2])));
    let kept_layers = layer_digests(&mirror.manifest(&copy(&images[0])));

    // A Pod (no kubelet here: it stays Pending, which counts as running) runs one copy.
    apply(
        &plane,
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "runner", "namespace": "shop"},
            "spec": {"containers": [{"name": "app", "image": copy(&images[1])}]},
        }),
    );
    // Two images leave the ImageSet: retired, then deleted once 3 s have passed, except the
    // one the Pod runs.
    apply(&plane, &image_set(&images[..1]));
    wait_until("the unused copy deleted", Duration::from_secs(60), || {
        !mirror.manifest_exists(&copy(&images[2]))
    });
    let status = registry_object(&plane, "local")["status"].clone();
    assert!(mirror.manifest_exists(&copy(&images[0])), "{status}");
    assert!(mirror.manifest_exists(&copy(&images[1])), "{status}");
    wait_until("the kept copy says why", Duration::from_secs(30), || {
        let status = registry_object(&plane, "local")["status"].clone();
        status["retiring"].as_array().is_some_and(|r| {
            r.len() == 1
                && r[0]["reference"] == copy(&images[1])
                && r[0]["kept"] == "Pod shop/runner runs it"
        })
    });
    let status = registry_object(&plane, "local")["status"].clone();
    assert_eq!(status["mirroredImages"], 1, "{status}");
    assert!(
        status["mirroredBytes"].as_i64().unwrap() < bytes_of_three,
        "{status}"
    );

    // The Pod goes: so does its copy.
    // (No kubelet confirms a graceful deletion here.)
    plane.kubectl_ok(&[
        "delete",
        "pod",
        "runner",
        "-n",
        "shop",
        "--grace-period=0",
        "--force",
    ]);
    wait_until(
        "the copy the Pod ran deleted",
        Duration::from_secs(60),
        || !mirror.manifest_exists(&copy(&images[1])),
    );
    wait_until("nothing retiring", Duration::from_secs(30), || {
        registry_object(&plane, "local")["status"]["retiring"].is_null()
    });
    let metrics = http_get(probe, "/metrics");
    assert_eq!(
        metric(&metrics, "coral_mirror_deleted_total{registry=\"local\"}"),
        Some(2.0),
        "{metrics}"
    );

    // The registry's own garbage collection, run while it does not serve (as the managed
    // registry's init container does), frees the deleted images' layers and only those.
    let gc = manifests("deploy/overlays/registry/registry.yaml")
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "coral-registry-gc")
        .expect("the garbage collection's ConfigMap");
    for layer in &gone_layers {
        assert!(
            mirror.blob_path(layer).exists(),
            "{layer} is stored before the sweep"
        );
    }
    let output = mirror.garbage_collect(gc["data"]["gc.yml"].as_str().unwrap());
    for layer in &gone_layers {
        assert!(
            !mirror.blob_path(layer).exists(),
            "{layer} stayed: {output}"
        );
    }
    for layer in &kept_layers {
        assert!(mirror.blob_path(layer).exists(), "{layer} went: {output}");
    }
    assert!(mirror.manifest_exists(&copy(&images[0])));

    // The ImageSet itself is deleted: its last copy retires before its finalizer goes, and
    // is deleted after the retention.
    plane.kubectl_ok(&["delete", "imageset", "mirrored", "-n", "shop"]);
    wait_until(
        "the deleted set's copy deleted",
        Duration::from_secs(60),
        || !mirror.manifest_exists(&copy(&images[0])),
    );
    wait_until("nothing mirrored", Duration::from_secs(30), || {
        let status = registry_object(&plane, "local")["status"].clone();
        status["mirroredImages"] == 0 && status["retiring"].is_null()
    });
}
