//! Real nodes: kubelets and their containerds (`tests/support/node.rs`) start the Pods Coral
//! steers, from the images Coral's agents put there, with nothing pulled from outside.

use super::*;
use crate::buildkit::BuildKit;
use crate::node::{Node, NodeOptions};

/// A control plane for real nodes with Coral installed, the namespace `shop` opted in.
fn node_control_plane() -> ControlPlane {
    let plane = install_coral(
        ControlPlane::start_for_nodes(&control_plane_binaries()),
        &[],
    );
    plane.kubectl_ok(&["label", "namespace", "shop", "coral.dev/inject=enabled"]);
    plane
}

/// A real node named `name` with the label `pool=<pool>`.
fn real_node(plane: &ControlPlane, name: &str, pool: &str, sandbox: &str) -> Node {
    let node = Node::start(
        plane,
        &control_plane_binaries(),
        name,
        sandbox,
        &NodeOptions {
            labels: vec![("pool".into(), pool.into())],
            ..NodeOptions::default()
        },
    );
    println!("node {name} ({}) is Ready", node.ip);
    node
}

/// The policy ConfigMap `coral-system/coral-policies` as `deploy/` makes it (the default
/// policies), with these settings.
fn policy_configmap(plane: &ControlPlane, settings: &Value) {
    let mut args: Vec<String> = [
        "create",
        "configmap",
        "coral-policies",
        "-n",
        "coral-system",
    ]
    .map(String::from)
    .to_vec();
    for entry in std::fs::read_dir("policies").unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "rego") {
            args.push(format!("--from-file={}", entry.path().display()));
        }
    }
    args.push(format!("--from-literal=settings.json={settings}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    plane.kubectl_ok(&args);
}

/// The Coral image, built by BuildKit from the repository's Dockerfile (its `prebuilt` stage,
/// given the binary the suite built, stripped, and a base made on the machine) and pushed to
/// `registry`; its reference.
fn coral_image(registry: &runtime::Registry) -> String {
    let bin = BuildKit::binaries().unwrap_or_else(|| {
        panic!(
            "{} is not set: run scripts/buildkit.sh",
            crate::buildkit::BIN_ENV
        )
    });
    runtime::require("strip", "binutils");
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_coral"));
    let base = registry.push_base("coral-test/base", "1", binary);
    let context = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(context.path().join("coral"))
        .arg(binary)
        .status()
        .unwrap();
    assert!(status.success(), "strip {}", binary.display());
    let started = Instant::now();
    let buildkit = BuildKit::start(&bin, &[&registry.host()]);
    let reference = format!("{}/coral:test", registry.host());
    buildkit.build_dockerfile(
        "prebuilt",
        &[("BASE_IMAGE", &base)],
        &[("binary", context.path())],
        &reference,
    );
    println!(
        "the Coral image built from the Dockerfile with BuildKit (daemon start included) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    reference
}

/// A Pod as the API server has it.
fn pod(plane: &ControlPlane, namespace: &str, name: &str) -> Value {
    let output = plane.kubectl(&["get", "pod", name, "-n", namespace, "-o", "json"]);
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

/// The items of `kubectl get ARGS -o json` (none when it fails).
fn items(plane: &ControlPlane, args: &[&str]) -> Vec<Value> {
    let output = plane.kubectl(&[args, &["-o", "json"]].concat());
    serde_json::from_slice::<Value>(&output.stdout)
        .ok()
        .and_then(|list| list["items"].as_array().cloned())
        .unwrap_or_default()
}

/// The Pods of `app` in `shop`.
fn pods_of(plane: &ControlPlane, app: &str) -> Vec<Value> {
    items(
        plane,
        &["get", "pods", "-n", "shop", "-l", &format!("app={app}")],
    )
}

/// `reason: message` of the Events of one object, oldest first.
fn events_of(plane: &ControlPlane, namespace: &str, name: &str) -> Vec<String> {
    let selector = format!("involvedObject.name={name}");
    items(
        plane,
        &[
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            &selector,
            "--sort-by=.lastTimestamp",
        ],
    )
    .iter()
    .map(|event| {
        format!(
            "{}: {}",
            event["reason"].as_str().unwrap_or_default(),
            event["message"].as_str().unwrap_or_default()
        )
    })
    .collect()
}

/// A Node's labels.
fn node_labels(plane: &ControlPlane, node: &str) -> Value {
    serde_json::from_str(&plane.kubectl_ok(&[
        "get",
        "node",
        node,
        "-o",
        "jsonpath={.metadata.labels}",
    ]))
    .unwrap_or(Value::Null)
}

/// Waits until the Pod `fetch` reads is Running and Ready; returns it.
fn wait_running(what: &str, limit: Duration, mut fetch: impl FnMut() -> Value) -> Value {
    let mut pod = Value::Null;
    wait_until(what, limit, || {
        pod = fetch();
        running_and_ready(&pod)
    });
    pod
}

/// Applies a Deployment `app` of one replica of `image` in `shop` and waits until its Pod
/// runs: steered to node-a, the only node holding the image, and started from what is there
/// (nothing pulled). Returns the Pod and its Events, and prints them.
fn start_steered(plane: &ControlPlane, app: &str, image: &str) -> (Value, Vec<String>) {
    let mut workload = deployment(app, &[image], json!({}));
    workload["spec"]["replicas"] = json!(1);
    apply(plane, &workload);
    let started = wait_running(
        "the steered Pod Running and Ready",
        Duration::from_secs(120),
        || pods_of(plane, app).into_iter().next().unwrap_or_default(),
    );
    let name = started["metadata"]["name"].as_str().unwrap();
    let events = events_of(plane, "shop", name);
    println!(
        "steered pod {name}: phase {}, events {events:#?}",
        started["status"]["phase"]
    );
    assert_eq!(started["spec"]["nodeName"], "node-a", "{started}");
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("Pulled: ") && e.contains("already present on machine")),
        "{events:?}"
    );
    (started, events)
}

/// Whether a Pod is Running with every container ready.
fn running_and_ready(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

#[test]
#[ignore = "needs the control plane and kubelet built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN), in a network namespace of its own; scripts/test.sh runs it"]
fn a_steered_pod_starts_from_the_image_the_agent_pulled_with_the_source_stopped() {
    let plane = node_control_plane();
    // The pause image of the sandboxes comes from a registry that stays; the application's
    // from a source that is stopped before the workload is applied.
    let infra = runtime::Registry::start(None);
    let sandbox = infra.push_pause("pause", "1");
    let mut source = runtime::Registry::start(None);
    let app = source.push_runnable("shop/app", "1", "the application");
    let nodes = [
        real_node(&plane, "node-a", "a", &sandbox),
        real_node(&plane, "node-b", "b", &sandbox),
    ];

    // The agents, one per node on its containerd; the ImageSet selects node-a only.
    let kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-agent");
    let _agents: Vec<support::process::Daemon> = nodes
        .iter()
        .map(|node| start_agent_process(&node.name, &node.containerd, &kubeconfig, &[]))
        .collect();
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "app", "namespace": "shop"},
            "spec": {"images": [app], "nodeSelector": {"matchLabels": {"pool": "a"}}},
        }),
    );
    // The default policies, with `pullPolicy: Never` in their settings.
    policy_configmap(&plane, &json!({"pullPolicy": "Never"}));
    let probe = deployment("probe", &[app.as_str()], json!({}));
    let steering = Steering::start_with(
        &plane,
        &["--policies-configmap", "coral-system/coral-policies"],
        &probe,
        |object| {
            let template = &object["spec"]["template"]["spec"];
            template["nodeSelector"][label(&app)] == "available"
                && template["containers"][0]["imagePullPolicy"] == "Never"
        },
    );
    assert_eq!(node_labels(&plane, "node-a")[label(&app)], "available");
    assert!(node_labels(&plane, "node-b").get(label(&app)).is_none());

    // Nothing can be pulled from outside now.
    source.stop();
    let (started, events) = start_steered(&plane, "app", &app);
    assert_eq!(
        started["spec"]["containers"][0]["imagePullPolicy"], "Never",
        "{started}"
    );
    assert!(
        started["status"]["containerStatuses"][0]["state"]["running"].is_object(),
        "{started}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("Started: ")),
        "{events:?}"
    );

    // The control: the same container forced onto node-b, in a namespace Coral does not
    // steer, cannot start there.
    plane.kubectl_ok(&["create", "namespace", "elsewhere"]);
    apply(
        &plane,
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "forced", "namespace": "elsewhere"},
            "spec": {
                "nodeName": "node-b",
                "containers": [{"name": "c0", "image": app, "imagePullPolicy": "Never"}],
            },
        }),
    );
    let mut forced = Value::Null;
    wait_until(
        "ErrImageNeverPull on node-b",
        Duration::from_secs(60),
        || {
            forced = pod(&plane, "elsewhere", "forced");
            forced["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                == "ErrImageNeverPull"
        },
    );
    let events = events_of(&plane, "elsewhere", "forced");
    println!(
        "forced pod: phase {}, waiting {}, events {events:#?}",
        forced["status"]["phase"],
        forced["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
    );
    assert_eq!(forced["status"]["phase"], "Pending", "{forced}");
    drop(steering);
}

#[test]
#[ignore = "needs the control plane and kubelet built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN) and BuildKit by scripts/buildkit.sh (CORAL_BUILDKIT_BIN), in a network namespace of its own; scripts/test.sh runs it"]
fn coral_runs_on_a_real_node_from_the_image_its_dockerfile_builds() {
    let plane = node_control_plane();
    let registry = runtime::Registry::start(None);
    let sandbox = registry.push_pause("pause", "1");
    let image = coral_image(&registry);
    let _node = real_node(&plane, "node-a", "a", &sandbox);

    // `coral demo` in the image: the webhook over HTTPS on the Pod's loopback, the embedded
    // policies, the example workloads. As non-root: the image's USER is 65532.
    plane.kubectl_ok(&["create", "namespace", "demo"]);
    apply(
        &plane,
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "demo", "namespace": "demo"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsNonRoot": true},
                "containers": [{"name": "coral", "image": image, "args": ["demo"]}],
            },
        }),
    );
    let mut done = Value::Null;
    wait_until("the demo Pod ends", Duration::from_secs(120), || {
        done = pod(&plane, "demo", "demo");
        matches!(
            done["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        )
    });
    let logs = plane.kubectl(&["logs", "demo", "-n", "demo"]);
    let logs = String::from_utf8_lossy(&logs.stdout).into_owned();
    let events = events_of(&plane, "demo", "demo");
    println!(
        "demo pod: phase {}, events {events:#?}\nits log ends: {}",
        done["status"]["phase"],
        logs.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
    );
    assert_eq!(done["status"]["phase"], "Succeeded", "{done}\n{logs}");
    assert!(logs.contains("Deployment shop/legacy: unchanged"), "{logs}");
}

/// An install's objects for the real nodes: every Coral container running `image` (those of
/// `coral:…`, `deploy/`'s name for it, get it), and reaching the API server at the address
/// Pods have a route to (no kube-proxy routes the `kubernetes` Service here: see
/// `tests/support/control_plane.rs`).
fn for_real_nodes(plane: &ControlPlane, mut objects: Vec<Value>, image: &str) -> Vec<Value> {
    for object in &mut objects {
        let Some(containers) = object
            .pointer_mut("/spec/template/spec/containers")
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for container in containers {
            let current = container["image"].as_str().unwrap_or_default();
            if !current.starts_with("coral:") && current != image {
                continue;
            }
            container["image"] = json!(image);
            let extra = [
                json!({"name": "KUBERNETES_SERVICE_HOST", "value": support::control_plane::POD_REACHABLE_ADDRESS}),
                json!({"name": "KUBERNETES_SERVICE_PORT", "value": plane.port.to_string()}),
            ];
            match container["env"].as_array_mut() {
                Some(env) => env.extend(extra),
                None => container["env"] = json!(extra),
            }
        }
    }
    objects
}

/// Applies an install server-side, as `kubectl apply --server-side` does: the namespace and
/// the CRDs first, then the rest once the CRDs are Established.
fn install(plane: &ControlPlane, objects: Vec<Value>) {
    let (first, rest): (Vec<Value>, Vec<Value>) = objects
        .into_iter()
        .partition(|o| o["kind"] == "Namespace" || o["kind"] == "CustomResourceDefinition");
    for (items, wait) in [(first, true), (rest, false)] {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let output = plane.kubectl_stdin(
            &["apply", "--server-side", "--field-manager=coral-test"],
            &list,
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        if wait {
            wait_for_crds(plane);
        }
    }
}

/// Waits until Coral's agent runs Ready on both real nodes and its controller and webhook on
/// `replicas` Pods each, in `namespace`; then reads every Coral Pod's `/metrics` through the
/// API server's pod proxy. Prints what it saw.
fn wait_coral_ready(plane: &ControlPlane, namespace: &str, replicas: u32, what: &str) {
    let started = Instant::now();
    let status = |kind: &str, name: &str| -> Value {
        let output = plane.kubectl(&["get", kind, name, "-n", namespace, "-o", "json"]);
        serde_json::from_slice::<Value>(&output.stdout)
            .map(|object| object["status"].clone())
            .unwrap_or(Value::Null)
    };
    let mut last = Value::Null;
    wait_until(
        "the agent on both nodes, the controller and the webhook Ready",
        Duration::from_secs(180),
        || {
            let agents = status("daemonset", "coral-agent");
            let controller = status("deployment", "coral-controller");
            let webhook = status("deployment", "coral-webhook");
            last = json!({"agents": agents, "controller": controller, "webhook": webhook});
            agents["desiredNumberScheduled"] == 2
                && agents["numberReady"] == 2
                && controller["readyReplicas"] == replicas
                && webhook["readyReplicas"] == replicas
        },
    );
    println!(
        "{what} Ready on real nodes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for component in ["coral-agent", "coral-controller", "coral-webhook"] {
        let selector = format!("app.kubernetes.io/name={component}");
        let pods = items(plane, &["get", "pods", "-n", namespace, "-l", &selector]);
        assert!(!pods.is_empty(), "{component}: {last}");
        for pod in pods {
            assert!(running_and_ready(&pod), "{pod}");
            let name = pod["metadata"]["name"].as_str().unwrap();
            let metrics = plane.kubectl_ok(&[
                "get",
                "--raw",
                &format!("/api/v1/namespaces/{namespace}/pods/{name}:8080/proxy/metrics"),
            ]);
            assert!(metrics.contains("coral_"), "{name}: {metrics}");
            println!(
                "  {component} pod {name} on {}: Running and Ready, /metrics {} lines",
                pod["spec"]["nodeName"],
                metrics.lines().count()
            );
        }
    }
}

/// Two real nodes (`pool=a`, `pool=b`) on a control plane for them, a registry on loopback
/// holding the pause image and the Coral image built from the Dockerfile.
struct CoralCluster {
    nodes: [Node; 2],
    plane: ControlPlane,
    /// The Coral image's reference.
    image: String,
    registry: runtime::Registry,
}

impl CoralCluster {
    fn start() -> Self {
        let plane = ControlPlane::start_for_nodes(&control_plane_binaries());
        let registry = runtime::Registry::start(None);
        let sandbox = registry.push_pause("pause", "1");
        let image = coral_image(&registry);
        let nodes = [
            real_node(&plane, "node-a", "a", &sandbox),
            real_node(&plane, "node-b", "b", &sandbox),
        ];
        Self {
            nodes,
            plane,
            image,
            registry,
        }
    }

    /// `kubectl apply -k deploy/` with the image, until every component is Ready; then the
    /// namespace `shop`, opted in to Coral's injections.
    fn install_deploy(&self) {
        install(
            &self.plane,
            for_real_nodes(
                &self.plane,
                support::helm::kustomize("deploy/"),
                &self.image,
            ),
        );
        wait_coral_ready(&self.plane, "coral-system", 2, "deploy/");
        self.plane.kubectl_ok(&["create", "namespace", "shop"]);
        self.plane
            .kubectl_ok(&["label", "namespace", "shop", "coral.dev/inject=enabled"]);
    }
}

#[test]
#[ignore = "needs the control plane and kubelet built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN) and BuildKit by scripts/buildkit.sh (CORAL_BUILDKIT_BIN), in a network namespace of its own; scripts/test.sh runs it"]
fn deploy_runs_on_real_nodes_and_steers_a_pod_through_its_service() {
    let cluster = CoralCluster::start();
    let plane = &cluster.plane;
    let mut source = runtime::Registry::start(None);
    let app = source.push_runnable("shop/app", "1", "the application");
    cluster.install_deploy();

    // The agent pod of node-a pulls an ImageSet's image through its hostPath CRI socket and
    // labels its Node with its projected token; the API server calls the webhook at its
    // Service's endpoints; the kubelet starts the steered Pod with nothing pulled.
    apply(
        plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "app", "namespace": "shop"},
            "spec": {"images": [app], "nodeSelector": {"matchLabels": {"pool": "a"}}},
        }),
    );
    wait_until("the ImageSet Ready", Duration::from_secs(120), || {
        condition_of(&image_set_status_of(plane, "app"), "Ready").0 == "True"
    });
    let probe = deployment("probe", &[app.as_str()], json!({}));
    wait_until(
        "a server-side dry run mutated through the webhook's Service",
        Duration::from_secs(60),
        || {
            let output = plane.kubectl_stdin(&["create", "--dry-run=server", "-o", "json"], &probe);
            let object: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            object["spec"]["template"]["spec"]["nodeSelector"][label(&app)] == "available"
        },
    );
    source.stop();
    start_steered(plane, "app", &app);
}

#[test]
#[ignore = "needs the control plane and kubelet built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN), BuildKit by scripts/buildkit.sh (CORAL_BUILDKIT_BIN) and Helm by scripts/helm.sh (CORAL_HELM_BIN), in a network namespace of its own; scripts/test.sh runs it"]
fn the_helm_chart_runs_on_real_nodes() {
    let cluster = CoralCluster::start();
    let (plane, image) = (&cluster.plane, &cluster.image);
    let (repository, tag) = image.rsplit_once(':').unwrap();
    let objects = support::helm::render(&[
        "--set",
        &format!("image.repository={repository}"),
        "--set",
        &format!("image.tag={tag}"),
    ]);
    let namespace = objects
        .iter()
        .find(|o| o["kind"] == "Namespace")
        .and_then(|o| o["metadata"]["name"].as_str())
        .expect("the chart makes its namespace")
        .to_string();
    install(plane, for_real_nodes(plane, objects, image));
    wait_coral_ready(plane, &namespace, 2, "the Helm chart");
}

/// A pull secret `name` in `namespace` for `registry`'s user.
fn pull_secret(plane: &ControlPlane, namespace: &str, name: &str, registry: &runtime::Registry) {
    use base64::Engine as _;
    let config = runtime::docker_config(&registry.host(), "coral", "s3cret");
    apply(
        plane,
        &json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": name, "namespace": namespace},
            "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config)},
        }),
    );
}

#[test]
#[ignore = "needs the control plane and kubelet built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN), in a network namespace of its own; scripts/test.sh runs it"]
fn a_private_image_coral_pulled_does_not_start_for_a_pod_without_its_credentials() {
    let plane = node_control_plane();
    let infra = runtime::Registry::start(None);
    let sandbox = infra.push_pause("pause", "1");
    let private = runtime::Registry::start(Some(("coral", "s3cret")));
    let app = private.push_runnable("team-a/app", "1", "private");
    // The kubelet checks a pod's own credentials before it starts an image it did not pull
    // with them (KEP-2535), also one it did not pull itself.
    let node = Node::start(
        &plane,
        &control_plane_binaries(),
        "node-a",
        &sandbox,
        &NodeOptions {
            labels: vec![("pool".into(), "a".into())],
            config: json!({
                "featureGates": {"KubeletEnsureSecretPulledImages": true},
                "imagePullCredentialsVerificationPolicy": "AlwaysVerify",
            }),
        },
    );
    // node-b keeps the kubelet's default, NeverVerifyPreloadedImages: the image its runtime
    // holds, which the kubelet did not pull, is not checked there.
    let unchecked = real_node(&plane, "node-b", "a", &sandbox);
    for namespace in ["team-a", "team-b"] {
        plane.kubectl_ok(&["create", "namespace", namespace]);
    }
    pull_secret(&plane, "team-a", "regcred", &private);
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "private", "namespace": "team-a"},
            "spec": {
                "images": [app], "imagePullSecrets": [{"name": "regcred"}],
                "nodeSelector": {"matchLabels": {"pool": "a"}},
            },
        }),
    );
    let _controller = start_controller(&plane, "controller-0");
    let kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-agent");
    let _agents = [
        start_agent_process("node-a", &node.containerd, &kubeconfig, &[]),
        start_agent_process("node-b", &unchecked.containerd, &kubeconfig, &[]),
    ];
    wait_until(
        "the agents pulled the private image with team-a's secret",
        Duration::from_secs(60),
        || {
            ["node-a", "node-b"]
                .iter()
                .all(|node| node_labels(&plane, node)[label(&app)] == "available")
        },
    );

    // team-b has no credentials and is not steered by Coral: forced onto the node that holds
    // the image, its container is refused.
    let pod = |namespace: &str, name: &str, node: &str, secrets: Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "nodeName": node, "imagePullSecrets": secrets,
                "containers": [{"name": "c0", "image": app, "imagePullPolicy": "IfNotPresent"}],
            },
        })
    };
    apply(&plane, &pod("team-b", "app", "node-a", json!([])));
    let mut refused = Value::Null;
    wait_until(
        "team-b's container refused the image",
        Duration::from_secs(60),
        || {
            refused = self::pod(&plane, "team-b", "app");
            matches!(
                refused["status"]["containerStatuses"][0]["state"]["waiting"]["reason"].as_str(),
                Some("ErrImagePull" | "ImagePullBackOff")
            )
        },
    );
    let events = events_of(&plane, "team-b", "app");
    println!(
        "team-b pod: phase {}, waiting {}, events {events:#?}",
        refused["status"]["phase"],
        refused["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
    );
    assert_eq!(refused["status"]["phase"], "Pending", "{refused}");

    // The control: team-a's own Pod, with the credentials, starts from the same image.
    apply(
        &plane,
        &pod("team-a", "app", "node-a", json!([{"name": "regcred"}])),
    );
    let started = wait_running(
        "team-a's Pod Running and Ready",
        Duration::from_secs(60),
        || self::pod(&plane, "team-a", "app"),
    );
    println!(
        "team-a pod: phase {}, events {:#?}",
        started["status"]["phase"],
        events_of(&plane, "team-a", "app")
    );

    // Why AlwaysVerify: on node-b, with the default policy, team-b's Pod starts from the image
    // Coral pulled with team-a's credentials.
    apply(&plane, &pod("team-b", "unchecked", "node-b", json!([])));
    let unverified = wait_running(
        "team-b's Pod Running on node-b",
        Duration::from_secs(60),
        || self::pod(&plane, "team-b", "unchecked"),
    );
    println!(
        "team-b pod on node-b (NeverVerifyPreloadedImages): phase {}",
        unverified["status"]["phase"]
    );
}

/// What Coral recorded of `image` on `node`: its label, and its NodeImage entry's state and
/// digest.
fn recorded(plane: &ControlPlane, node: &str, image: &str) -> (Value, Value, Value) {
    let labels = node_labels(plane, node);
    let output = plane.kubectl(&["get", "nodeimage", node, "-o", "json"]);
    let status = serde_json::from_slice::<Value>(&output.stdout)
        .map(|n| n["status"].clone())
        .unwrap_or(Value::Null);
    let normalized = coral::image::ImageReference::parse(image)
        .unwrap()
        .to_string();
    let entry = status["images"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["image"] == image || e["image"] == normalized.as_str())
        .cloned()
        .unwrap_or(Value::Null);
    (
        labels[label(image)].clone(),
        entry["state"].clone(),
        entry["digest"].clone(),
    )
}

#[test]
#[ignore = "needs the control plane and kubelet built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN) and BuildKit by scripts/buildkit.sh (CORAL_BUILDKIT_BIN), in a network namespace of its own; scripts/test.sh runs it"]
fn coral_as_pods_loses_nothing_through_a_runtime_and_kubelet_crash_a_rollout_and_a_webhook_pod_deleted_under_load()
 {
    let mut cluster = CoralCluster::start();
    let next = cluster.registry.copy(&cluster.image, "coral", "next");
    let source = runtime::Registry::start(None);
    let app = source.push_runnable("shop/app", "1", "the application");
    // Large enough (30 MB of random bytes) that the runtime is killed while it pulls.
    let mut random = Vec::with_capacity(30 << 20);
    while random.len() < 30 << 20 {
        random.extend_from_slice(&fastrand::u64(..).to_le_bytes());
    }
    let big = source.push_bytes("shop/big", "1", &random);
    drop(random);
    cluster.install_deploy();
    let (plane, nodes) = (&cluster.plane, &mut cluster.nodes);
    let image_set = |name: &str, image: &str| {
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"images": [image], "nodeSelector": {"matchLabels": {"pool": "a"}}},
        })
    };
    apply(plane, &image_set("app", &app));
    wait_until("the app ImageSet Ready", Duration::from_secs(120), || {
        condition_of(&image_set_status_of(plane, "app"), "Ready").0 == "True"
    });
    let before = recorded(plane, "node-a", &app);
    assert_eq!(before.0, "available", "{before:?}");
    let unchanged = |what: &str| {
        let now = recorded(plane, "node-a", &app);
        assert_eq!(
            now, before,
            "after {what}: the app's record on node-a changed"
        );
        assert_eq!(
            condition_of(&image_set_status_of(plane, "app"), "Ready").0,
            "True",
            "after {what}"
        );
    };

    // 1. node-a's containerd and kubelet die while its agent pod pulls the large image.
    apply(plane, &image_set("big", &big));
    // The event: containerd's log says the pull started.
    let log = nodes[0].containerd.dir.path().join("containerd.log");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = format!(r#"PullImage \"{big}\""#);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read_log().contains(&started) {
        assert!(Instant::now() < deadline, "the agent never pulled {big}");
        std::thread::sleep(Duration::from_millis(10));
    }
    nodes[0].containerd.stop();
    nodes[0].kill_kubelet();
    let finished = read_log()
        .lines()
        .any(|line| line.contains(&started) && line.contains("returns image reference"));
    println!(
        "killed node-a's containerd and kubelet while its agent pulled {big} (the pull had {}ended)",
        if finished { "" } else { "not " }
    );
    nodes[0].containerd.resume();
    nodes[0].restart_kubelet(plane);
    let deadline = Instant::now() + Duration::from_secs(120);
    while condition_of(&image_set_status_of(plane, "big"), "Ready").0 != "True" {
        if Instant::now() > deadline {
            let agent = plane.kubectl(&[
                "logs",
                "-n",
                "coral-system",
                "--tail=30",
                "-l",
                "app.kubernetes.io/name=coral-agent",
                "--prefix",
            ]);
            panic!(
                "the large image is not available on node-a after the crash: {}\nNodeImage: {}\npods: {}\nagent logs: {}{}\nkubelet: {}",
                image_set_status_of(plane, "big"),
                plane.kubectl_ok(&["get", "nodeimage", "node-a", "-o", "jsonpath={.status}"]),
                plane.kubectl_ok(&["get", "pods", "-A", "-o", "wide"]),
                String::from_utf8_lossy(&agent.stdout),
                String::from_utf8_lossy(&agent.stderr),
                nodes[0].kubelet_log(),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_coral_ready(plane, "coral-system", 2, "Coral after node-a's crash");
    unchanged("the crash");

    // 2. A rolling update of the agent DaemonSet to another image.
    plane.kubectl_ok(&[
        "set",
        "image",
        "daemonset/coral-agent",
        "-n",
        "coral-system",
        &format!("agent={next}"),
    ]);
    wait_until("the agents rolled out", Duration::from_secs(120), || {
        let output = plane.kubectl(&[
            "get",
            "daemonset",
            "coral-agent",
            "-n",
            "coral-system",
            "-o",
            "json",
        ]);
        let set: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        set["status"]["observedGeneration"] == set["metadata"]["generation"]
            && set["status"]["updatedNumberScheduled"] == 2
            && set["status"]["numberReady"] == 2
            && set["status"]["numberUnavailable"].is_null()
    });
    println!("the agent DaemonSet rolled out to {next}");
    unchanged("the rollout");
    assert_eq!(recorded(plane, "node-a", &big).0, "available");

    // 3. failurePolicy Fail, and a webhook pod deleted while Pods are created: every Pod
    //    admitted was mutated; the others were refused, none went through unmutated.
    plane.kubectl_ok(&[
        "patch",
        "mutatingwebhookconfiguration",
        "coral",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Fail"}]"#,
    ]);
    let probe = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "probe-", "namespace": "shop",
                     "annotations": {"coral.dev/inject": "selectors,pull-policy"}},
        "spec": {"containers": [{"name": "c0", "image": app}]},
    });
    let mutated = |object: &Value| object["spec"]["nodeSelector"][label(&app)] == "available";
    wait_until(
        "the webhook answers under Fail",
        Duration::from_secs(30),
        || {
            let output = plane.kubectl_stdin(&["create", "--dry-run=server", "-o", "json"], &probe);
            mutated(&serde_json::from_slice(&output.stdout).unwrap_or(Value::Null))
        },
    );
    let victim = plane
        .kubectl_ok(&[
            "get",
            "pods",
            "-n",
            "coral-system",
            "-l",
            "app.kubernetes.io/name=coral-webhook",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .trim()
        .to_string();
    let (mut admitted, mut refused) = (0, 0);
    for i in 0..40 {
        if i == 10 {
            plane.kubectl_ok(&[
                "delete",
                "pod",
                &victim,
                "-n",
                "coral-system",
                "--wait=false",
            ]);
        }
        let output = plane.kubectl_stdin(&["create", "--dry-run=server", "-o", "json"], &probe);
        if output.status.success() {
            let object: Value = serde_json::from_slice(&output.stdout).unwrap();
            assert!(mutated(&object), "admitted unmutated: {object}");
            admitted += 1;
        } else {
            refused += 1;
        }
    }
    println!(
        "webhook pod {victim} deleted under load with failurePolicy Fail: {admitted} admitted (all mutated), {refused} refused"
    );
    assert!(admitted > 0);
    wait_coral_ready(
        plane,
        "coral-system",
        2,
        "Coral after the webhook pod's deletion",
    );
    unchanged("the webhook pod's deletion");
}
