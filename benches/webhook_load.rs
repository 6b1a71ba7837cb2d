//! Load on the real `coral webhook --standalone` over HTTPS with keep-alive: Deployments with
//! three containers and their own nodeSelector against a state of 1,000 managed images and
//! 5,000 nodes, each holding 100 of the images (5 % tainted, 1 % cordoned).
//!
//! `cargo bench --bench webhook_load` (or `just bench`) prints: the time from start to ready
//! and memory, latency at a fixed 1,000 requests/s, the highest rate closed-loop clients reach
//! and its latency (the same Deployment each time: answered from the decision cache), the same
//! two with the decision cache off, the same closed loop against a no-op AdmissionReview
//! responder on the same TLS and HTTP stack (the floor, this benchmark re-run as a server in
//! its own process: it parses the review and answers allowed), Coral's rate as a share of the
//! floor's, and the server's resident memory (now and peak). With `CORAL_CONTROL_PLANE_BIN`
//! set (`scripts/control-plane.sh` prints it) it then measures cluster mode against the real
//! control plane. The load generator runs in this process, on the same two cores as the
//! servers.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark stops on setup failures

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use support::process::memory_kib;
use support::{Authority, Webhook, read_response, request_bytes, tls_stream};

/// Set in the environment of the floor server: its certificate and key files.
const FLOOR_ENV: &str = "CORAL_BENCH_FLOOR_TLS";

const IMAGE_SETS: usize = 100;
const IMAGES_PER_SET: usize = 10;
const NODES: usize = 5_000;
/// Node pools; ImageSet `s` targets pool `s % POOLS`, so each node holds the images of
/// `IMAGE_SETS / POOLS` sets.
const POOLS: usize = 10;

fn image(set: usize, i: usize) -> String {
    format!("registry.example.com/team-{set}/service-{i}:1.{i}")
}

/// ImageSet `s` targets pool `s % POOLS`; each node belongs to one pool and holds the images
/// of every set that targets it (100 of the 1,000). Written as JSON, the format for states
/// this large (parsed as it is read).
fn state_json() -> String {
    let image_sets: Vec<_> = (0..IMAGE_SETS)
        .map(|set| {
            let images: Vec<String> = (0..IMAGES_PER_SET).map(|i| image(set, i)).collect();
            json!({
                "metadata": {"name": format!("set-{set}"), "namespace": "shop"},
                "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": format!("p{}", set % POOLS)}}},
            })
        })
        .collect();
    let nodes: Vec<_> = (0..NODES)
        .map(|node| {
            let pool = node % POOLS;
            let images: Vec<String> = (pool..IMAGE_SETS)
                .step_by(POOLS)
                .flat_map(|set| (0..IMAGES_PER_SET).map(move |i| image(set, i)))
                .collect();
            let mut entry = json!({
                "name": format!("node-{node}"),
                "labels": {"pool": format!("p{pool}"), "kubernetes.io/hostname": format!("node-{node}")},
                "images": images,
            });
            // 5 % tainted, 1 % cordoned.
            if node % 20 == 1 {
                entry["taints"] = json!([{"key": "dedicated", "value": "batch", "effect": "NoSchedule"}]);
            }
            if node % 100 == 2 {
                entry["unschedulable"] = json!(true);
            }
            entry
        })
        .collect();
    json!({
        "imageSets": image_sets,
        "nodes": nodes,
        "namespaces": [{"name": "shop", "labels": {"coral.dev/inject": "enabled"}}],
    })
    .to_string()
}

fn review_body() -> Vec<u8> {
    let containers: Vec<_> = (0..3)
        .map(|i| json!({"name": format!("c{i}"), "image": image(7, i)}))
        .collect();
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "shop", "namespace": "shop", "annotations": {"coral.dev/inject": "selectors,pull-policy"}},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {"metadata": {"labels": {"app": "shop"}}, "spec": {
                "nodeSelector": {"pool": "p7"},
                "containers": containers,
            }},
        },
    });
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "bench",
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "namespace": "shop",
            "name": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "bench"},
            "object": deployment,
        }
    }))
    .unwrap()
}

/// Sends the benchmark's request once and checks that the answer patches it.
async fn assert_mutated(address: SocketAddr, ca: &str) {
    let mut stream = tls_stream(address, ca).await.expect("connect");
    stream
        .write_all(&request_bytes("/mutate", &review_body(), false))
        .await
        .unwrap();
    let (_, answer) = read_response(&mut stream).await;
    assert!(
        answer.contains("\"patch\""),
        "the benchmark request must be mutated: {answer}"
    );
}

/// Latencies, sorted.
struct Run {
    latencies: Vec<Duration>,
    elapsed: Duration,
    errors: usize,
}

impl Run {
    fn at(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() - 1) as f64 * q) as usize;
        self.latencies[i].as_secs_f64() * 1000.0
    }

    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// `N req/s, p50 …, p99 …, max …, errors N`.
    fn summary(&self) -> String {
        format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, errors {}",
            self.rate(),
            self.at(0.5),
            self.at(0.99),
            self.at(1.0),
            self.errors
        )
    }
}

/// `connections` keep-alive connections; with `rate`, each sends on a fixed schedule and
/// latency counts from the scheduled time (no coordinated omission); without, each sends as
/// fast as answers come.
async fn load(
    server: (SocketAddr, &str),
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
) -> Run {
    let (address, ca) = server;
    let body = request_bytes("/mutate", &review_body(), true);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let body = body.clone();
        let mut stream = tls_stream(address, ca).await.expect("connect");
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
            let mut next = Instant::now();
            while started.elapsed() < duration {
                let sent = match interval {
                    // Behind schedule because the last answer came late: the wait counts
                    // against the server, so latency runs from the scheduled time.
                    Some(interval) if Instant::now() > next => {
                        let scheduled = next;
                        next += interval;
                        scheduled
                    }
                    // On schedule: wait, and count from the actual send (the timer's own
                    // millisecond granularity is not the server's latency).
                    Some(interval) => {
                        tokio::time::sleep_until(next.into()).await;
                        next += interval;
                        Instant::now()
                    }
                    None => Instant::now(),
                };
                stream.write_all(&body).await.expect("send");
                let (status, _) = read_response(&mut stream).await;
                if status == 200 {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut run = Run {
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
        errors: 0,
    };
    for task in tasks {
        let (latencies, errors) = task.await.unwrap();
        run.latencies.extend(latencies);
        run.errors += errors;
    }
    run.elapsed = started.elapsed();
    run.latencies.sort();
    run
}

/// The floor: the webhook's TLS and HTTP stack (`coral::webhook::accept_https`) with a
/// handler that parses the AdmissionReview and answers allowed. Runs as this benchmark
/// re-executed, on the runtime the `coral` binary uses, and prints its address.
fn serve_floor(tls_files: &str) {
    use axum::Router;
    use axum::body::Bytes;
    use axum::routing::post;
    use coral::webhook::admission::Review;

    let (cert, key) = tls_files.split_once(',').unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let cert = Arc::new(
            coral::webhook::tls::ReloadingCert::load(cert.as_ref(), key.as_ref()).unwrap(),
        );
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(cert.server_config().unwrap()));
        let app = Router::new().route(
            "/mutate",
            post(|body: Bytes| async move {
                match Review::parse(&body) {
                    Ok(review) => axum::Json(json!({
                        "apiVersion": "admission.k8s.io/v1",
                        "kind": "AdmissionReview",
                        "response": {"uid": review.uid, "allowed": true},
                    })),
                    Err(error) => axum::Json(json!({"error": error.to_string()})),
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("floor address={}", listener.local_addr().unwrap());
        coral::webhook::accept_https(
            listener,
            tls,
            app,
            Duration::from_secs(5),
            std::future::pending::<()>(),
        )
        .await;
    });
}

/// The floor server in its own process; killed and waited for when dropped.
struct Floor {
    child: Child,
    address: SocketAddr,
    authority: Authority,
    _dir: tempfile::TempDir,
}

impl Floor {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::new();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        authority.issue(&cert, &key);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(FLOOR_ENV, format!("{},{}", cert.display(), key.display()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .rsplit("address=")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Self {
            child,
            address,
            authority,
            _dir: dir,
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status images a kubelet reports per node in the cluster-mode run.
const STATUS_IMAGES: usize = 50;

/// Cluster mode against the real control plane (`scripts/control-plane.sh`): the same
/// ImageSets, and 5,000 Nodes created through the API with the 100 image labels each, and a
/// status as a kubelet reports it (capacity, conditions, addresses and 50 `status.images`
/// entries), which the webhook must not keep. Prints the time from the webhook's start to
/// ready (its first list included) and its memory.
fn cluster_mode(runtime: &tokio::runtime::Runtime, bin: &std::path::Path, phase: Duration) {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams, PostParams};

    let plane = support::control_plane::ControlPlane::start(bin);
    plane.kubectl_ok(&["apply", "--server-side", "-f", "deploy/base/crds"]);
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/imagesets.coral.dev",
        "crd/nodeimages.coral.dev",
    ]);
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"coral.dev/inject": "enabled"}}});
    let sets: Vec<Value> = (0..IMAGE_SETS)
        .map(|set| {
            let images: Vec<String> = (0..IMAGES_PER_SET).map(|i| image(set, i)).collect();
            json!({"apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": format!("set-{set}"), "namespace": "shop"},
                "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": format!("p{}", set % POOLS)}}}})
        })
        .collect();
    let mut items = vec![namespace];
    items.extend(sets);
    let output = plane.kubectl_stdin(
        &["apply", "--server-side"],
        &json!({"apiVersion": "v1", "kind": "List", "items": items}),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let created = Instant::now();
    runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&plane.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let nodes: Api<Node> = Api::all(kube::Client::try_from(config).unwrap());
        let results: Vec<()> = futures::stream::iter(0..NODES)
            .map(|node| {
                let nodes = nodes.clone();
                async move {
                    let pool = node % POOLS;
                    let name = format!("node-{node}");
                    let mut labels = serde_json::Map::new();
                    labels.insert("pool".into(), format!("p{pool}").into());
                    labels.insert("kubernetes.io/hostname".into(), name.clone().into());
                    for set in (pool..IMAGE_SETS).step_by(POOLS) {
                        for i in 0..IMAGES_PER_SET {
                            let reference = coral::image::ImageReference::parse(&image(set, i)).unwrap();
                            labels.insert(coral::image::label_key(&reference), "available".into());
                        }
                    }
                    let object: Node = serde_json::from_value(json!({
                        "apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": name, "labels": labels},
                    }))
                    .unwrap();
                    nodes.create(&PostParams::default(), &object).await.unwrap();
                    let images: Vec<Value> = (0..STATUS_IMAGES)
                        .map(|i| {
                            let digest = format!("{:064x}", node * STATUS_IMAGES + i);
                            json!({"names": [
                                format!("registry.example.com/team-{i}/service@sha256:{digest}"),
                                format!("registry.example.com/team-{i}/service:1.{i}"),
                            ], "sizeBytes": 50_000_000 + i})
                        })
                        .collect();
                    let resources = json!({"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"});
                    let conditions: Vec<Value> = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
                        .map(|kind| json!({
                            "type": kind, "status": if kind == "Ready" { "True" } else { "False" },
                            "reason": "KubeletReady", "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": "2026-12-01T00:00:00Z", "lastTransitionTime": "2026-12-01T00:00:00Z",
                        }))
                        .into();
                    let status = json!({"status": {
                        "capacity": resources, "allocatable": resources,
                        "conditions": conditions,
                        "addresses": [{"type": "InternalIP", "address": format!("10.{}.{}.{}", node / 65536, node / 256 % 256, node % 256)},
                                      {"type": "Hostname", "address": format!("node-{node}")}],
                        "nodeInfo": {"kubeletVersion": "v1.36.3", "containerRuntimeVersion": "containerd://2.1.0",
                                     "osImage": "Debian GNU/Linux 13", "kernelVersion": "6.12.0", "architecture": "amd64",
                                     "operatingSystem": "linux", "machineID": "m", "systemUUID": "s", "bootID": "b",
                                     "kubeProxyVersion": ""},
                        "images": images,
                    }});
                    nodes
                        .patch_status(&format!("node-{node}"), &PatchParams::default(), &Patch::Merge(status))
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        assert_eq!(results.len(), NODES);
    });
    println!(
        "cluster mode: {NODES} Nodes ({} image labels and {STATUS_IMAGES} status.images each) and {IMAGE_SETS} ImageSets created in the real API server in {:.0} s",
        IMAGE_SETS / POOLS * IMAGES_PER_SET,
        created.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let webhook = Webhook::start_with_kubeconfig(&plane.kubeconfig, &["--workers", "2"]);
    let ready = runtime.block_on(async {
        loop {
            let (status, _) = support::get_probe(&webhook, "/readyz").await;
            if status == 200 {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the webhook never became ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let pid = webhook.child.id();
    // What the webhook logs, in seconds since its first list began: every resource listed,
    // then the first snapshot built.
    let logged = |message: &str| {
        webhook
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|line| line.contains(message))
            .and_then(|line| {
                line.split("seconds=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(f64::NAN)
    };
    let listed = logged("cluster state listed");
    let built = logged("first snapshot built since the first list began");
    println!(
        "cluster mode: the first list of every resource took {listed:.2} s (the API server sending {NODES} Nodes in pages of 100); from the list to ready {:.2} s   target: under 1 s; from the process start to ready {:.2} s; RSS {:.1} MiB, peak {:.1} MiB   target: peak < 64 MiB",
        built - listed,
        ready.as_secs_f64(),
        memory_kib(pid, "VmRSS:") as f64 / 1024.0,
        memory_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    let ca = webhook.authority.pem();
    let run = runtime.block_on(async {
        assert_mutated(webhook.https, &ca).await;
        let run = load((webhook.https, ca.as_str()), 8, Some(1000.0), phase).await;
        let (_, metrics) = support::get_probe(&webhook, "/metrics").await;
        let rebuilds = metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(r#"coral_reloads_total{result="success",what="state"} "#)
            })
            .unwrap_or("0")
            .to_string();
        println!("cluster mode: snapshots built since the start: {rebuilds}");
        run
    });
    println!(
        "cluster mode, fixed 1,000 req/s, 8 connections: {}; after it RSS {:.1} MiB, peak {:.1} MiB",
        run.summary(),
        memory_kib(pid, "VmRSS:") as f64 / 1024.0,
        memory_kib(pid, "VmHWM:") as f64 / 1024.0
    );
}

fn main() {
    if let Ok(tls_files) = std::env::var(FLOOR_ENV) {
        serve_floor(&tls_files);
        return;
    }
    // `cargo test --all-targets` runs this file too, without `--bench`: then a short run only
    // checks that it works.
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let phase = if benchmarking {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(500)
    };
    if !benchmarking {
        println!(
            "check run (no --bench): short phases, possibly unoptimized; not benchmark figures"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Set to measure cluster mode alone.
    if std::env::var_os("CORAL_BENCH_CLUSTER_ONLY").is_some() {
        if let Some(bin) = support::control_plane::ControlPlane::binaries() {
            cluster_mode(&runtime, &bin, phase);
        }
        return;
    }
    let state = state_json();
    let started = Instant::now();
    let webhook = Webhook::start(&state, &["--workers", "2"]);
    let ca = webhook.authority.pem();
    let coral = (webhook.https, ca.as_str());
    println!(
        "state: {} managed images, {NODES} nodes in {POOLS} pools holding {} images each (5 % tainted, 1 % cordoned), {:.1} MB of JSON",
        IMAGE_SETS * IMAGES_PER_SET,
        IMAGE_SETS / POOLS * IMAGES_PER_SET,
        state.len() as f64 / 1e6
    );
    println!(
        "webhook ready in {:.2} s (process start to ready)   target: under 1 s; RSS {:.1} MiB, peak {:.1} MiB",
        started.elapsed().as_secs_f64(),
        memory_kib(webhook.child.id(), "VmRSS:") as f64 / 1024.0,
        memory_kib(webhook.child.id(), "VmHWM:") as f64 / 1024.0
    );
    drop(state);
    let (coral_max, uncached_max, floor_max) = runtime.block_on(async {
        assert_mutated(webhook.https, &ca).await;
        load(coral, 4, None, phase / 5).await;

        let fixed = load(coral, 8, Some(1000.0), phase).await;
        println!(
            "Coral, fixed 1,000 req/s, 8 connections: {}   target: p99 < 2 ms",
            fixed.summary()
        );

        let max = load(coral, 16, None, phase).await;
        println!(
            "Coral, closed loop, 16 connections (the same Deployment each time: answered from the decision cache): {}",
            max.summary()
        );

        // Every request evaluated: the cache off.
        let uncached = Webhook::start(
            &state_json(),
            &["--workers", "2", "--decision-cache-mib", "0"],
        );
        let uncached_ca = uncached.authority.pem();
        let server = (uncached.https, uncached_ca.as_str());
        load(server, 4, None, phase / 5).await;
        let uncached_fixed = load(server, 8, Some(1000.0), phase).await;
        println!(
            "Coral without the decision cache, fixed 1,000 req/s, 8 connections: {}",
            uncached_fixed.summary()
        );
        let uncached_max = load(server, 16, None, phase).await;
        println!(
            "Coral without the decision cache, closed loop, 16 connections (every request evaluated): {}",
            uncached_max.summary()
        );
        drop(uncached);

        let floor = Floor::start();
        let floor_ca = floor.authority.pem();
        let server = (floor.address, floor_ca.as_str());
        load(server, 4, None, phase / 5).await;
        let floor_max = load(server, 16, None, phase).await;
        println!(
            "floor (no-op AdmissionReview responder, same TLS and HTTP stack), closed loop, 16 connections: {}",
            floor_max.summary()
        );
        (max, uncached_max, floor_max)
    });
    println!(
        "Coral / floor throughput: {:.0} % with the decision cache   goal: at least 50 %; {:.0} % with every request evaluated",
        coral_max.rate() / floor_max.rate() * 100.0,
        uncached_max.rate() / floor_max.rate() * 100.0
    );
    let pid = webhook.child.id();
    println!(
        "server memory: RSS {:.1} MiB, peak RSS {:.1} MiB   target: peak < 64 MiB",
        memory_kib(pid, "VmRSS:") as f64 / 1024.0,
        memory_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    drop(webhook);
    match support::control_plane::ControlPlane::binaries() {
        Some(bin) if benchmarking => cluster_mode(&runtime, &bin, phase),
        Some(_) => println!("cluster mode: benchmarked with --bench only"),
        None => println!(
            "cluster mode: not measured; set {}=$(bash scripts/control-plane.sh) to measure it against the real control plane",
            support::control_plane::BIN_ENV
        ),
    }
}
