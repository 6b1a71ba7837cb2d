//! Pulls through the agent's engine against a plain loop of CRI PullImage calls, on the same
//! real containerd and local registry, and the real `coral agent`'s CPU and memory once idle.
//!
//! `cargo bench --bench pull` (or `just bench`) prints, for 20 small images: the median time of
//! a plain sequential loop of PullImage calls, of the engine limited to one pull at a time (its
//! overhead: the ratio to the plain loop), and of the engine with its default of two; then the
//! CPU share and resident memory of `coral agent` holding those 20 images, watched by a
//! scripted API server, when nothing changes.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark stops on setup failures

#[path = "../tests/support/runtime.rs"]
#[allow(dead_code)]
mod runtime;

#[path = "../tests/support/api_server.rs"]
#[allow(dead_code)]
mod api_server;

#[path = "../tests/support/process.rs"]
#[allow(dead_code)] // the tests' helpers beside the benchmark's
mod process;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coral::agent::cri::Cri;
use coral::agent::engine::{Engine, EngineOptions};
use coral::agent::tracker::RetryPolicy;
use coral::credentials::Keyring;
use coral::image::ImageReference;
use coral::metrics::AgentMetrics;
use serde_json::json;

use api_server::{ApiServer, list};
use process::{Kill, memory_kib};
use runtime::{Containerd, Registry};

const IMAGES: usize = 20;

async fn remove_all(cri: &Cri, images: &[String]) {
    for image in images {
        cri.remove(image).await.unwrap();
    }
}

async fn plain_loop(cri: &Cri, images: &[String]) -> Duration {
    let started = Instant::now();
    for image in images {
        cri.pull(image, None).await.unwrap();
    }
    started.elapsed()
}

async fn through_engine(address: &str, images: &[String], concurrency: usize) -> Duration {
    let engine = Engine::new(
        Cri::new(address).unwrap(),
        EngineOptions {
            max_concurrent_pulls: concurrency,
            retry: RetryPolicy::default(),
            resync: Duration::from_secs(60),
            image_fs_budget: None,
            pin_images: false,
        },
        AgentMetrics::new(),
    );
    let mut changes = engine.subscribe();
    let keyring = Arc::new(Keyring::new());
    let started = Instant::now();
    engine.set_wanted(
        images
            .iter()
            .map(|i| (ImageReference::parse(i).unwrap(), keyring.clone())),
    );
    let runner = tokio::spawn(engine.clone().run());
    while engine.snapshot().counts().available < images.len() {
        changes.changed().await.unwrap();
    }
    let elapsed = started.elapsed();
    runner.abort();
    elapsed
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

fn probe(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return String::new();
    };
    let _ = write!(stream, "GET {path} HTTP/1.0\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

async fn idle_agent(containerd: &Containerd, images: &[String], window: Duration) {
    let node = json!({"apiVersion": "v1", "kind": "Node",
                      "metadata": {"name": "node-a", "uid": "node-uid", "resourceVersion": "1"}});
    let server = ApiServer::start(
        BTreeMap::from([
            (
                "/apis/coral.dev/v1alpha1/imagesets".to_string(),
                list(
                    "coral.dev/v1alpha1",
                    "ImageSetList",
                    vec![json!({
                        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                        "metadata": {"name": "bench", "namespace": "default", "resourceVersion": "1"},
                        "spec": {"images": images},
                    })],
                ),
            ),
            ("/api/v1/nodes".to_string(), list("v1", "NodeList", vec![node.clone()])),
        ]),
        BTreeMap::new(),
        BTreeMap::from([
            ("/api/v1/nodes/node-a".to_string(), node),
            (
                "/apis/coral.dev/v1alpha1/nodeimages/node-a".to_string(),
                json!({"apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
                       "metadata": {"name": "node-a", "resourceVersion": "2"},
                       "spec": {"nodeName": "node-a"}}),
            ),
        ]),
    )
    .await;
    let probe_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let probes = format!("127.0.0.1:{probe_port}");
    // Killed and waited for when dropped, even if the measurement panics.
    let child = Kill(
        server
            .coral()
            .args(["agent", "--node-name", "node-a", "--probe-listen", &probes])
            .args(["--cri-socket", &containerd.address()])
            .env("CORAL_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = format!("coral_agent_images{{state=\"available\"}} {}", images.len());
    while !probe(&probes, "/metrics").contains(&settled)
        || !probe(&probes, "/readyz").contains("200 OK")
    {
        assert!(Instant::now() < deadline, "the agent never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the first writes finish, then watch it idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes_before = server.writes().len();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "idle coral agent holding {} images, over {:.0} s: CPU {:.3}% of one core; RSS {:.1} MiB (peak {:.1} MiB); API writes while idle: {}",
        images.len(),
        elapsed,
        100.0 * cpu / elapsed,
        memory_kib(pid, "VmRSS:") as f64 / 1024.0,
        memory_kib(pid, "VmHWM:") as f64 / 1024.0,
        server.writes().len() - writes_before,
    );
}

fn main() {
    // `cargo test --all-targets` runs this file too, without `--bench`: then one short round
    // only checks that it works.
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let (rounds, window) = if benchmarking {
        (5, Duration::from_secs(30))
    } else {
        println!("check run (no --bench): one round, short idle window; not benchmark figures");
        (1, Duration::from_secs(2))
    };
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    let images: Vec<String> = (0..IMAGES)
        .map(|i| registry.push(&format!("bench/image-{i}"), "1.0", &format!("content {i}")))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let address = containerd.address();
        let cri = Cri::new(&address).unwrap();
        let (mut plain, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            plain.push(plain_loop(&cri, &images).await);
            remove_all(&cri, &images).await;
            one.push(through_engine(&address, &images, 1).await);
            remove_all(&cri, &images).await;
            two.push(through_engine(&address, &images, 2).await);
            remove_all(&cri, &images).await;
        }
        let (plain, one, two) = (median(plain), median(one), median(two));
        println!(
            "{IMAGES} images, median of {rounds}: plain PullImage loop {:.0} ms; engine, 1 pull at a time {:.0} ms (ratio {:.2}); engine, 2 at a time (default) {:.0} ms (ratio {:.2})",
            plain.as_secs_f64() * 1000.0,
            one.as_secs_f64() * 1000.0,
            one.as_secs_f64() / plain.as_secs_f64(),
            two.as_secs_f64() * 1000.0,
            two.as_secs_f64() / plain.as_secs_f64(),
        );
        idle_agent(&containerd, &images, window).await;
    });
}
